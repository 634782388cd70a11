"""Tile sweep of the grouped GEMMs on the benchmark's own routing draws: per-kernel GPU times per variant.

  PYTHONPATH=. python3 experiments/tune_tiles.py --out=$OUT/tune.jsonl

For each workload (experiments/workloads.py draws, the same routing as experiments/benchmark.py) and each
tile variant, the layer's kernel path runs under jit and `GpuTimer` (L2 flushed before every call, median)
reports GEMM1, GEMM2, combine and the rest (routing, plan, schedule). Every variant's output is checked
against the xla path (float32, highest matmul precision) with SPEC.md's criterion.

Variant names: `m{block_m}` then GEMM1 `n{block_n}w{warps}s{stages}` / GEMM2 `n{block_n}k{block_k}w..s..`;
`bf16` keeps the SwiGLU output in bfloat16; `c{block_t}x{block_h}` the combine's tile;
`xlaroute` routes with XLA instead of the fused routing kernels. The best variants become the device's
entries in moe_pallas/kernels/tiling.py (experiments/PERF.md keeps what each sweep showed).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import app, flags

_WORKLOADS = flags.DEFINE_string("workloads", "1,7,16,57,80", "Small-T workloads (benchmark.py --workloads syntax).")
_LARGE = flags.DEFINE_string("large_workloads", "901,14107", "Large-T workloads (uniform) for the large-T variants.")
_ALL_LOCAL = flags.DEFINE_string("all_local_workloads", "14107", "Workloads run with all_local routing (large-T variants).")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per variant.")
_ONLY = flags.DEFINE_list("only", [], "Run only these variant names (plus the default).")
_OUT = flags.DEFINE_string("out", "tune.jsonl", "JSONL output.")
_WEIGHTS_LAYOUT = flags.DEFINE_enum("weights_layout", "spec", ["spec", "block_major"],
                                    "The expert weights' order in the timed calls (benchmark.py's flag): the "
                                    "tiles were measured on [E, N, K]; block-major reads them faster (PERF 64).")
_BUDGET = flags.DEFINE_float("max_seconds", 540.0, "Stop starting new variants after this much wall time.")


def _gemm(bm, bn, bk, warps, stages, group_m=8, split_k=1):
  from moe_pallas.kernels.tiling import GemmTiling
  return GemmTiling(block_m=bm, block_n=bn, block_k=bk, group_m=group_m, num_warps=warps, num_stages=stages,
                    split_k=split_k)


def _variant(bm, g1, g2, *, combine=(8, 256), bf16=False, fused=None, split_k=1, group_m=8):
  """g1 = (block_n, warps, stages); g2 = (block_n, block_k, warps, stages[, split_k]); combine = (block_t, block_h)."""
  from moe_pallas.kernels.tiling import CombineTiling, MoETiling
  split_k2 = g2[4] if len(g2) > 4 else 1
  tiling = MoETiling(gemm1=_gemm(bm, g1[0], 128, g1[1], g1[2], group_m=group_m, split_k=split_k),
                     gemm2=_gemm(bm, g2[0], g2[1], g2[2], g2[3], group_m=group_m, split_k=split_k2),
                     combine=CombineTiling(*combine))
  name = (f"m{bm}_n{g1[0]}w{g1[1]}s{g1[2]}" + (f"sk{split_k}" if split_k > 1 else "")
          + f"_n{g2[0]}k{g2[1]}w{g2[2]}s{g2[3]}" + (f"sk{split_k2}" if split_k2 > 1 else "")
          + f"_c{combine[0]}x{combine[1]}" + (f"_g{group_m}" if group_m != 8 else "")
          + ("_bf16" if bf16 else "") + {None: "", True: "_fused", False: "_xlaroute"}[fused])
  return name, tiling, bf16, fused


def _with_combine(base, name, block_t, block_h, num_warps=4, branch_per_pick=False):
  import dataclasses
  from moe_pallas.kernels.tiling import CombineTiling
  combine = CombineTiling(block_t, block_h, num_warps, branch_per_pick)
  return name, dataclasses.replace(base, combine=combine), False, None


def combine_branch_variants(base):
  """The combine with one token a program and each pick's row read under a branch (`CombineTiling.
  branch_per_pick`, as the peer's combine: 107 us at T=14107 against our 128)."""
  branch = ((1024, 4), (512, 4), (1024, 8))
  return [*(_with_combine(base, f"combine_branch_c1x{h}w{w}", 1, h, w, True) for h, w in branch),
          *(_with_combine(base, f"combine_masked_c{t}x{h}w4", t, h) for t, h in ((8, 256), (2, 512)))]


def gemm1_one_launch_variants(base):
  """GEMM1 as one launch for every tile count (no idle second launch, 1.3-2.1 us a call at T=14-80): 2
  stages (68 KB of SMEM, 3 programs an SM) on 8 or 4 warps, 4 warps with 3 or 4 stages; and the 8-warp
  launch with 2 or 4 stages, or the busy 4-warp one with 2 or 3 (the same bits: stages change no sum)."""
  import dataclasses
  if base.gemm1_busy is None:
    return []
  one = lambda **kw: dict(gemm1=dataclasses.replace(base.gemm1, **kw), gemm1_busy=None, busy_min_tiles=0)
  return [(name, dataclasses.replace(base, **kw), False, None) for name, kw in (
      ("g1_one_launch_w8s2", one(num_stages=2)), ("g1_one_launch_w4s2", one(num_warps=4, num_stages=2)),
      # Block-major weights (PERF 64) moved the probe's best launch toward 4 warps: 4 warps with 3-4 stages.
      ("g1_one_launch_w4s3", one(num_warps=4, num_stages=3)), ("g1_one_launch_w4s4", one(num_warps=4, num_stages=4)),
      ("g1_w8s2", dict(gemm1=dataclasses.replace(base.gemm1, num_stages=2))),
      ("g1_w8s4", dict(gemm1=dataclasses.replace(base.gemm1, num_stages=4))),
      *((f"g1_busy_w4s{stages}", dict(gemm1_busy=dataclasses.replace(base.gemm1_busy, num_stages=stages)))
        for stages in (2, 3)))]


def combine_variants(base):
  """The combine's tile at large T, where it reads ~1 bf16 row a token (T=14107: 127 us for ~400 MB moved,
  3.2 TB/s): longer row segments a program (block_h) and fewer tokens a tile."""
  shapes = ((4, 512, 4), (2, 1024, 4), (1, 2048, 4), (4, 1024, 8), (2, 2048, 8), (8, 512, 8), (8, 256, 8))
  return [_with_combine(base, f"default_c{t}x{h}w{w}", t, h, w) for t, h, w in shapes]


def split_k_variants():
  """Split-K, for the T at which few experts leave most SMs idle (T=1, 7: two experts)."""
  return [_variant(16, (128, 8, 4), (64, 128, 4, 3), split_k=split_k) for split_k in (1, 2, 4, 8)] + [
      _variant(16, (128, 4, 3), (64, 128, 4, 3), split_k=4), _variant(16, (128, 4, 4), (64, 128, 4, 3), split_k=8),
      # GEMM2 split-K too (its partial rows summed by the combine): 2 experts x 112 N-tiles x 16 K steps.
      _variant(16, (128, 8, 4), (64, 128, 4, 3, 2), split_k=4), _variant(16, (128, 8, 4), (64, 128, 4, 3, 4), split_k=4),
      _variant(16, (128, 8, 4), (128, 128, 4, 3, 4), split_k=4)]


def mosaic_variant():
  """Both GEMMs as the Mosaic GPU kernel (64-row tiles; GEMM1's quant block 128), the H200 combine."""
  from moe_pallas.kernels.tiling import CombineTiling, MoETiling
  return ("mosaic", MoETiling(gemm1=_gemm(64, 128, 128, 8, 3), gemm2=_gemm(64, 128, 128, 4, 3),
                              combine=CombineTiling(8, 256), gemm_kernels="mosaic"), False, None)


def mosaic_fused_variant():
  """The Mosaic GEMMs with SwiGLU + quant in GEMM1's epilogue (`gemm_kernels="mosaic_fused_swiglu"`)."""
  import dataclasses
  name, tiles, bf16, fused = mosaic_variant()
  return "mosaic_fused", dataclasses.replace(tiles, gemm_kernels="mosaic_fused_swiglu"), bf16, fused


def mosaic_fused_split_variant():
  """The fused epilogue split by columns over both compute warpgroups (`gemm_kernels="mosaic_fused_swiglu_split"`)."""
  import dataclasses
  name, tiles, bf16, fused = mosaic_variant()
  return "mosaic_fused_split", dataclasses.replace(tiles, gemm_kernels="mosaic_fused_swiglu_split"), bf16, fused


def gemm2_and_combine_variants(base):
  """GEMM2's N-tile and pipeline, and the combine's tile, with GEMM1 as the table has it (its busy launch
  included): at T=14-62 the peer's GEMM2 (16x128 tiles, 4 warps, 3-4 stages) was 1-10 us faster than ours
  (16x64, 3 stages) at 9 of 14 rows, its combine ~1 us faster at every row (results/h200_2026-11-30_s5)."""
  import dataclasses
  out = []
  # Split-K (sk2): GEMM2 at T=1/7 is latency-bound, 16 K steps a program (PERF 20); maybe at T=14-80 too.
  launches = ((128, 4, 3, 1), (128, 4, 4, 1), (64, 4, 4, 1), (128, 8, 4, 1), (32, 4, 4, 1), (64, 4, 3, 2),
              (128, 4, 3, 2))
  for block_n, warps, stages, split in launches:
    gemm2 = dataclasses.replace(base.gemm2, block_n=block_n, num_warps=warps, num_stages=stages, split_k=split)
    name = f"g2_n{block_n}w{warps}s{stages}" + (f"sk{split}" if split > 1 else "")
    out.append((name, dataclasses.replace(base, gemm2=gemm2), False, None))
  combines = ((4, 256), (2, 512), (4, 512), (2, 1024))
  return out + [_with_combine(base, f"comb_{bt}x{bh}", bt, bh) for bt, bh in combines]


def scales_in_gather_variant():
  """The H200 table's Mosaic path with the weight scales laid out in the row gather (`scales_in_gather`)."""
  import dataclasses
  name, tiles, bf16, fused = mosaic_fused_split_variant()
  return "mosaic_split_scales_in_gather", dataclasses.replace(tiles, scales_in_gather=True), bf16, fused


def no_xla_ops_variant():
  """The H200 table's Mosaic path with neither XLA op around its kernels: `scales_in_gather` and
  `weights_in_gemm2`."""
  import dataclasses
  name, tiles, bf16, fused = mosaic_fused_split_variant()
  tiles = dataclasses.replace(tiles, scales_in_gather=True, weights_in_gemm2=True)
  return "mosaic_split_no_xla_ops", tiles, bf16, fused


def stream_k_variants(base):
  """GEMM1 as the stream-K kernel (`GemmTiling.stream_k` programs per SM sharing the used tiles' work evenly),
  in place of the table's launch(es); GEMM2 and the combine as the table has them (PERF 24: the table's
  choice at <= 2 rows per expert; from 8 experts up it wins or loses with the experts touched)."""
  import dataclasses
  out = []
  for per_sm, warps, stages in ((1, 8, 4), (1, 8, 5), (2, 8, 3), (2, 4, 3), (3, 4, 2)):
    for in_kernel in (False, True):  # the fix-up as a second kernel, or by the last piece to arrive
      gemm1 = dataclasses.replace(base.gemm1, num_warps=warps, num_stages=stages, split_k=1, stream_k=per_sm,
                                  fixup_in_kernel=in_kernel)
      out.append((f"g1_stream_k{per_sm}w{warps}s{stages}" + ("_fixin" if in_kernel else ""),
                  dataclasses.replace(base, gemm1=gemm1, gemm1_busy=None, busy_min_tiles=0), False, None))
  return out


def k_unroll_variants(base):
  """K steps loaded together (`GemmTiling.k_unroll`: longer weight-row segments a stage, PERF 14, 27). GEMM1
  with 64-wide N-tiles and 2 K steps a stage holds the SMEM of today's 128 x 128 stage (2 x 64 x 256 bytes)
  and reads 256-byte row segments; its 1 x 64 output blocks make GEMM2's K step 64, unrolled 2 (128-byte
  segments, as today) or 4 (256). `g1n64u2` keeps the table's two GEMM1 launches (8 warps below
  `busy_min_tiles`, 4 from it); `w4`/`w8`: one launch with those warps."""
  import dataclasses
  if base.gemm1.stream_k or base.gemm1_busy is None:  # variants of the T=14-80 table's two GEMM1 launches
    return []
  out = []
  for g1_warps in (None, 4, 8):
    for g2_unroll, g2_n in ((2, 64), (4, 64), (4, 128)):
      gemm1 = dataclasses.replace(base.gemm1, block_n=64, k_unroll=2)
      gemm2 = dataclasses.replace(base.gemm2, block_n=g2_n, block_k=64, k_unroll=g2_unroll)
      tiles = dataclasses.replace(base, gemm1=gemm1, gemm2=gemm2,
                                  gemm1_busy=dataclasses.replace(base.gemm1_busy, block_n=64, k_unroll=2))
      if g1_warps:
        tiles = dataclasses.replace(tiles, gemm1=dataclasses.replace(gemm1, num_warps=g1_warps), gemm1_busy=None,
                                    busy_min_tiles=0)
      out.append((f"g1n64u2{f'w{g1_warps}' if g1_warps else ''}_g2n{g2_n}k64u{g2_unroll}", tiles, False, None))
  # GEMM2 alone with 256-byte segments (128-wide K steps, 2 a stage), GEMM1 as the table has it.
  out.append(("g2u2", dataclasses.replace(base, gemm2=dataclasses.replace(base.gemm2, k_unroll=2)), False, None))
  return out


def swap_ab_variants(base):
  """Each K step's product transposed (`GemmTiling.swap_ab`: the weight tile as the MMA's 64-row operand, the
  16 token rows as its columns, as the peer's 16-row tiles do): GEMM1 (both launches), GEMM2 (the table's
  launch, and the peer's 128-wide 4-stage one), and both. Then, with both GEMM1 launches swapped (as the
  `swap_g1` variant): the swapped 8-warp GEMM1 as the only launch (no idle second launch; unswapped,
  8 warps lost at 17+ tiles), or the peer's swapped 4-warp 4-stage launch as the only one; the busy launch
  swapped with 4 stages; the 8-warp launch as 4 warps and 4 stages. (GEMM1's two launches must agree on
  swap_ab, PERF 49: a variant that swaps one of them only is refused by MoETiling.)"""
  import dataclasses
  swapped = lambda g: None if g is None else dataclasses.replace(g, swap_ab=True)
  g1 = dict(gemm1=swapped(base.gemm1), gemm1_busy=swapped(base.gemm1_busy))
  g2 = dict(gemm2=swapped(base.gemm2))
  g2_wide = dict(gemm2=dataclasses.replace(base.gemm2, swap_ab=True, block_n=128, num_stages=4))
  out = [(name, dataclasses.replace(base, **kw), False, None) for name, kw in (
      ("swap_g1", g1), ("swap_g2", g2), ("swap_g2_n128s4", g2_wide), ("swap_both", {**g1, **g2}),
      ("swap_both_g2n128s4", {**g1, **g2_wide}))]
  swapped_gemm1 = dataclasses.replace(base, **g1)
  if swapped_gemm1.gemm1_busy is not None:
    busy = lambda **kw: dict(gemm1_busy=dataclasses.replace(swapped_gemm1.gemm1_busy, **kw))
    peer_launch = dataclasses.replace(swapped_gemm1.gemm1, num_warps=4, num_stages=4)
    out += [(name, dataclasses.replace(swapped_gemm1, **kw), False, None) for name, kw in (
        ("swap_g1_one_launch", dict(gemm1_busy=None, busy_min_tiles=0)),
        ("swap_g1_one_launch_w4s4", dict(gemm1=peer_launch, gemm1_busy=None, busy_min_tiles=0)),
        ("swap_busy_w4s4", busy(num_stages=4)),
        ("swap_g1_w4s4", dict(gemm1=peer_launch)))]
  return out


def program_order_variants(base):
  """The programs in M-tile order (`group_m=1`: each M-tile sweeps its N-tiles before the next, as the
  peer's launches do) instead of 8 M-tiles a sweep: at <= 32 rows per expert the M-tiles are mostly of
  different experts, so the grouping shares no weight tile; in order, the programs running together read
  fewer experts' weights. GEMM2 alone, and every Triton launch (the same bits: only the order changes)."""
  import dataclasses
  in_order = lambda g: None if g is None else dataclasses.replace(g, group_m=1)
  return [("g2_group1", dataclasses.replace(base, gemm2=in_order(base.gemm2)), False, None),
          ("group1", dataclasses.replace(base, gemm1=in_order(base.gemm1), gemm1_busy=in_order(base.gemm1_busy),
                                         gemm2=in_order(base.gemm2)), False, None)]


def small_t_variants(base):
  return [*gemm2_and_combine_variants(base), *combine_branch_variants(base), *gemm1_one_launch_variants(base),
      *stream_k_variants(base),
      *k_unroll_variants(base),
      *swap_ab_variants(base), *program_order_variants(base),
      bf16_rows_variant(base),
      mosaic_variant(), mosaic_fused_variant(),
      # GEMM1 in K ranges at 8-20 experts: 16 N-tiles x (8-20 experts) programs leave SMs with one
      # program beside SMs with two; more, shorter programs even that out, for a float32 partials
      # round trip and a SwiGLU kernel.
      _variant(16, (128, 8, 3), (64, 128, 4, 3), split_k=2), _variant(16, (128, 4, 3), (64, 128, 4, 3), split_k=2),
      _variant(16, (128, 4, 4), (64, 128, 4, 3), split_k=4), _variant(16, (128, 4, 4), (64, 128, 4, 3), split_k=7),
      ("default_xlaroute", base, False, False),
      _variant(16, (128, 8, 3), (64, 128, 4, 3)),
      _variant(16, (128, 4, 4), (64, 128, 4, 4)),
      _variant(16, (128, 4, 3), (64, 128, 4, 3)),
      _variant(32, (128, 8, 4), (64, 128, 4, 3)),
      _variant(16, (128, 8, 4), (128, 128, 8, 3)),
      _with_combine(base, "default_c16x512", 16, 512),
  ]


def chain_items_variants(base):
  """Each Mosaic CTA's work items as one chained TMA pipeline (`MoETiling.chain_items`; PERF 37): the next
  item's loads overlap this item's last K steps and epilogue; also with neither XLA op around the GEMMs
  (`scales_in_gather`, `weights_in_gemm2`), which lost at T=14107 by the extra TMA of each GEMM2 item that
  the chain may now hide (PERF 22)."""
  import dataclasses
  tiles = dataclasses.replace(_mosaic_tiles(base), chain_items=True)
  return [("chain_items", tiles, False, None),
          ("chain_items_no_xla_ops", dataclasses.replace(tiles, scales_in_gather=True, weights_in_gemm2=True),
           False, None)]


def mosaic_fused_paired_variant(base):
  """The fused GEMM1 with each compute warpgroup's 64 columns of up and gate (`gemm_kernels=
  "mosaic_fused_swiglu_paired"`): no branch per warpgroup around the wgmma (PERF 41); the table's other
  options where it has the Mosaic path."""
  import dataclasses
  return ("mosaic_fused_paired", dataclasses.replace(_mosaic_tiles(base), gemm_kernels="mosaic_fused_swiglu_paired"),
          False, None)


def _mosaic_tiles(base):
  """The table's tiles where they are the Mosaic path's, else the Mosaic fused-split variant's: the base of a
  variant that changes one Mosaic option."""
  return base if base.mosaic else mosaic_fused_split_variant()[1]


def mosaic_group_m_variants(base):
  """The table's Mosaic path with other M-tile groups in both GEMMs (`GemmTiling.group_m`: the order of the
  persistent CTAs' work items; the table's 32 above 512 rows per expert, else 8; PERF 61)."""
  import dataclasses
  tiles = _mosaic_tiles(base)
  return [(f"mosaic_group_m{g}", dataclasses.replace(tiles, gemm1=dataclasses.replace(tiles.gemm1, group_m=g),
                                                     gemm2=dataclasses.replace(tiles.gemm2, group_m=g)),
           False, None) for g in (4, 8, 16, 32)]


def bf16_rows_variant(base):
  """GEMM2's weighted rows as bfloat16 into the combine (`MoETiling.bf16_rows`): half the combine's reads."""
  import dataclasses
  return ("bf16_rows", dataclasses.replace(base, bf16_rows=True), False, None)


def large_t_variants(base, num_tokens):
  out = [bf16_rows_variant(base), mosaic_variant(), mosaic_fused_variant(), mosaic_fused_split_variant(),
         scales_in_gather_variant(), no_xla_ops_variant(),
         _with_combine(base, "default_c16x512", 16, 512),
         _with_combine(base, "default_c16x256", 16, 256),
         _variant(64, (128, 4, 3), (64, 128, 4, 3)), _variant(32, (128, 4, 3), (64, 128, 4, 3)),
         _variant(32, (128, 8, 4), (64, 128, 4, 3)), _variant(64, (128, 8, 3), (128, 128, 4, 3)),
         # L2 reuse of a weight tile across M-tiles (group_m) and a deeper pipeline, at the default tiles.
         _variant(64, (128, 8, 3), (128, 128, 4, 3), group_m=16), _variant(64, (128, 8, 3), (128, 128, 4, 3), group_m=32),
         _variant(64, (128, 8, 4), (128, 128, 4, 4)), *combine_variants(base), *combine_branch_variants(base),
         *chain_items_variants(base),
         mosaic_fused_paired_variant(base), *mosaic_group_m_variants(base)]
  if num_tokens * 8 <= 8192:
    out += [("default_xlaroute", base, False, False)]
  else:  # the fused routing kernels past their default range (layout in chunks of 256 blocks)
    out += [("default_fused", base, False, True)]
  return out


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  import moe_pallas as mp
  from experiments import tables
  from experiments import workloads as wl
  from experiments.timing import GpuTimer
  from moe_pallas import testing, weight_layout
  from moe_pallas.kernels import grouped_moe
  from moe_pallas.kernels.tiling import default_tiling

  t_start = time.time()
  config = mp.DEEPSEEK_V3
  device = jax.devices()[0]
  print(f"device: {device.device_kind}, jax {jax.__version__}", flush=True)
  weights = testing.random_weights(config, seed=0)
  timed_weights = weight_layout.experts_in_layout(weights, _WEIGHTS_LAYOUT.value)  # the reference: SPEC order
  timer = GpuTimer()
  L, K = config.num_local_experts, config.top_k

  def layer(tiling, bf16, fused):
    inter = jnp.bfloat16 if bf16 else jnp.float8_e4m3fn

    def run(logits, bias, hs, hss, w1, w1s, w2, w2s, offset):
      return grouped_moe.moe_layer_triton(logits, bias, hs, hss, w1, w1s, w2, w2s, offset, jnp.float32(2.5),
                                          config=config, tiling=tiling, intermediate_dtype=inter,
                                          fused_routing_kernels=fused)
    return jax.jit(run)

  def reference(logits, bias, hs, hss, offset):
    with jax.default_matmul_precision("highest"):
      return np.asarray(mp.moe_layer(logits, bias, hs, hss, *weights, local_expert_offset=offset,
                                     routed_scaling_factor=2.5, config=config, implementation="xla"),
                        np.float32)

  cases = []
  for spec, scenario, large in ((_WORKLOADS.value, "uniform", False), (_LARGE.value, "uniform", True),
                                (_ALL_LOCAL.value, "all_local", True)):
    if spec:
      cases += [(w, scenario, large) for w in wl.select(spec, config)]
  out_file = open(_OUT.value, "w")
  summary = []
  best = {}  # (T, scenario) -> [(row, tiling)]
  for workload, scenario, large in cases:
    d = wl.draw(config, workload, scenario)
    T, offset = workload.num_tokens, workload.local_expert_offset
    acts = d.activations(0)
    args = (*acts, *timed_weights, jnp.int32(offset))
    ref = reference(*acts, offset)
    base = default_tiling(T, K, L)
    variants = [("default", base, False, None)]
    variants += large_t_variants(base, T) if large else small_t_variants(base)
    if not large and T * K <= 2 * L:  # <= 2 rows per expert: few experts touched
      variants += split_k_variants()
    if _ONLY.value:
      variants = [v for v in variants if v[0] == "default" or v[0] in _ONLY.value]
    # A variant that is the table's entry itself (e.g. the stage count or combine tile it already has) would
    # time the default twice under another name.
    variants = [v for v in variants if v[0] == "default" or v[1:] != variants[0][1:]]
    for name, tiling, bf16, fused in variants:
      if time.time() - t_start > _BUDGET.value:
        print(f"budget spent: skipping {name} at T={T}", flush=True)
        continue
      try:
        t0 = time.time()
        fn = layer(tiling, bf16, fused)
        out = fn(*args).block_until_ready()
        compile_s = time.time() - t0
        times = timer.time_calls(fn, args, iters=_ITERS.value, warmup=2)
      except Exception as err:  # one bad variant must not hide the others
        print(f"T={T} {scenario} {name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
        continue
      metrics = testing.acceptance_metrics(np.asarray(out, np.float32), ref)
      parts = {"gemm1": 0.0, "gemm2": 0.0, "combine": 0.0, "other": 0.0}  # "other": routing included
      other_n = 0
      for kname, us in times.kernels:
        key = tables.kernel_group(kname)
        key = "other" if key == "routing" else key
        parts[key] += us
        other_n += key == "other"
      row = dict(T=T, offset=offset, scenario=scenario, pairs=d.pairs, experts=d.experts_touched, variant=name,
                 span_us=statistics.median(times.span_us), kernel_sum_us=statistics.median(times.kernel_sum_us),
                 **{f"{k}_us": round(v, 2) for k, v in parts.items()}, other_kernels=other_n,
                 num_kernels=times.num_kernels, matched=metrics["matched_ratio"], rel_l2=metrics["rel_l2"],
                 passed=metrics["passed"], compile_s=round(compile_s, 1), device=device.device_kind,
                 kernels=[(kname, round(us, 2)) for kname, us in times.kernels])
      out_file.write(json.dumps(row) + "\n")
      out_file.flush()
      line = (f"T={T:>5} {scenario:>9} p={d.pairs:>6} e={d.experts_touched:>2} {name:<40} g1 {parts['gemm1']:8.1f} "
              f"g2 {parts['gemm2']:8.1f} comb {parts['combine']:6.1f} other {parts['other']:6.1f}/{other_n:>2} "
              f"sum {row['kernel_sum_us']:8.1f} span {row['span_us']:8.1f} rel {metrics['rel_l2']:.2e} "
              f"{'ok' if metrics['passed'] else 'FAIL'}")
      routing = " ".join(f"{kname.replace('moe_', '')} {us:.1f}" for kname, us in times.kernels
                         if kname.startswith("moe_") and not any(p in kname for p in ("gemm", "combine")))
      line += f"  [{routing}]" if routing else ""
      print(line, flush=True)
      summary.append(line)
      best.setdefault((T, scenario), []).append((row, tiling))
  print("\n".join(summary))
  print("\nBest passing variant per workload (GEMM1 + GEMM2 + combine; the entries of this device's table in "
        "moe_pallas/kernels/tiling.py):")
  for (T, scenario), rows in best.items():
    passing = [(r["gemm1_us"] + r["gemm2_us"] + r["combine_us"], r, t) for r, t in rows if r["passed"]]
    if passing:
      us, r, t = min(passing, key=lambda entry: entry[0])
      print(f"T={T} {scenario} rows/expert={r['pairs'] / max(r['experts'], 1):.1f}: {r['variant']} {us:.1f} us\n  {t}")


if __name__ == "__main__":
  sys.exit(app.run(main))
