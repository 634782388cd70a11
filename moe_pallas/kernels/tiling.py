"""Tile sizes of the grouped GEMMs, with a per-shape default.

Constraints: block_n and block_k divide 128, so that a (block_n x block_k) weight tile sees one 128x128
weight scale and a K step one activation scale (the "row-scale" form: `acc = fma(dot(a, w), sa * sw,
acc)`, one FFMA per accumulator element per K step). GEMM1's K step is 128 (the activations' 1x128
scale block). GEMM1's epilogue quantizes SwiGLU's output in 1 x gemm1.block_n blocks, so GEMM2's K step
is gemm1.block_n: narrow GEMM1 tiles (more programs at small T) give finer, more accurate blocks.
"""

from __future__ import annotations

import dataclasses

import jax

from moe_pallas.config import SCALE_BLOCK  # the FP8 scale block of SPEC.md (1x128 activations, 128x128 weights)


@dataclasses.dataclass(frozen=True)
class GemmTiling:
  """One grouped GEMM's tiles and Triton launch parameters.

  Attributes:
    block_m: rows per M-tile (every tile belongs to one expert; 64 is wgmma's M per warpgroup).
    block_n: output columns per program.
    block_k: K step; 128 = the scale block.
    group_m: M-tiles visited together before moving to the next N-tile, so that a group's weight tile
      and activation rows stay in L2 (Triton's grouped ordering).
    num_warps, num_stages: Triton launch parameters (warps per program, software pipeline depth).
    split_k: above 1, K is split into this many ranges, one program each, for more programs on the weights
      when few experts are touched (T=1 reads two experts' W13 with only 2 x 16 unsplit programs). GEMM1's
      partials are summed in float32 in a fixed order by a second kernel that applies SwiGLU and the
      quant; GEMM2's by the combine, which adds each row's partials as it adds the token's rows.
    stream_k: above 0 (GEMM1 only), GEMM1 as `stream_k.gemm1_swiglu`: this many programs per SM share the
      used tiles' (N-tile, K step) work evenly, whatever the experts touched; items split between programs
      are summed in a fixed order by a second kernel.
    fixup_in_kernel: with stream_k, the split items summed inside the stream-K kernel, by the program whose
      piece arrives last (an integer arrival counter per item; the same order, the same bits), instead of by
      the second kernel.
    k_unroll: K steps whose tiles one loop iteration loads together before their dots (the same FMAs in the
      same order: the same bits). A weight row is then read k_unroll * block_k contiguous bytes at a time;
      HBM streams longer row segments faster (experiments/PERF.md 14, 27).
    swap_ab: each K step's product computed transposed, W tile @ activation rows.T ([block_n, block_m]; the
      weight tile as the MMA's row operand, the few rows as its columns, as SGLang's fused_moe_kernel does for
      16-row tiles), the accumulator transposed back once before the epilogue. The same products: in
      interpret mode equal up to float32 summation order; compiled, the fp8 MMA accumulates each K step in
      reduced precision, differently for the other shape (a few outputs differ by ~1 %, relative L2 ~2e-3;
      experiments/PERF.md 48). GEMM1's two launches (`MoETiling.gemm1_busy`) must agree on it (PERF 49).
  """

  block_m: int = 64
  block_n: int = 128
  block_k: int = SCALE_BLOCK
  group_m: int = 8
  num_warps: int = 4
  num_stages: int = 3
  split_k: int = 1
  stream_k: int = 0
  fixup_in_kernel: bool = False
  k_unroll: int = 1
  swap_ab: bool = False

  def __post_init__(self):
    for name in ("block_n", "block_k"):
      value = getattr(self, name)
      if SCALE_BLOCK % value or value < 32:
        raise ValueError(f"{name} must divide {SCALE_BLOCK} and be >= 32, got {value}")
    if self.block_m not in (16, 32, 64, 128):
      raise ValueError(f"block_m must be 16, 32, 64 or 128, got {self.block_m}")
    if self.group_m < 1:
      raise ValueError(f"group_m must be >= 1, got {self.group_m}")
    if self.split_k < 1:
      raise ValueError(f"split_k must be >= 1, got {self.split_k}")
    if self.stream_k < 0 or (self.stream_k and self.split_k != 1):
      raise ValueError(f"stream_k must be >= 0, and 0 with a split_k above 1; got stream_k={self.stream_k}, "
                       f"split_k={self.split_k}")
    if self.fixup_in_kernel and not self.stream_k:
      raise ValueError("fixup_in_kernel needs stream_k >= 1 (it is the stream-K kernel's fix-up)")
    if self.k_unroll < 1 or (self.k_unroll > 1 and self.stream_k):
      raise ValueError(f"k_unroll must be >= 1, and 1 with stream_k (its shares start at any K step); got "
                       f"k_unroll={self.k_unroll}, stream_k={self.stream_k}")


@dataclasses.dataclass(frozen=True)
class CombineTiling:
  """The combine kernel's program: block_t tokens x block_h output columns.

  `branch_per_pick`: one token a program (block_t must be 1), each pick's row read under a branch on its
  row index, as the peer's combine does: a pick that is not local issues no load instruction at all,
  instead of a masked one (at uniform T=14107 most tokens have 0 or 1 local pick of 8). The same sum in the
  same order: the same bits.
  """

  block_t: int = 16
  block_h: int = 512
  num_warps: int = 4
  branch_per_pick: bool = False

  def __post_init__(self):
    if self.branch_per_pick and self.block_t != 1:
      raise ValueError(f"branch_per_pick needs block_t=1 (one token a program), got block_t={self.block_t}")


GEMM_KERNELS = ("triton", "mosaic", "mosaic_fused_swiglu", "mosaic_fused_swiglu_split", "mosaic_fused_swiglu_paired")


@dataclasses.dataclass(frozen=True)
class MoETiling:
  """Tiles of GEMM1 (+ fused SwiGLU-quant), GEMM2 and the combine; the GEMMs share block_m (one schedule).

  `gemm1_busy`: GEMM1's launch parameters when `busy_min_tiles` or more M-tiles are in use, a count known
  only on the device (it depends on how many experts the tokens picked). Both GEMM1 variants are then
  launched; each program of the one not chosen exits at once (~2 us). None: `gemm1` always.

  `scales_in_gather`, `weights_in_gemm2`: with the Mosaic GEMMs, the weight scales' layout
  (`mosaic_gemm.weight_scale_rows`) done by programs of the row gather, and the routing weights multiplied
  into GEMM2's activation scales inside the kernel (`grouped_fp8_gemm(row_factor=...)`), instead of three
  XLA kernels (the same bits). The H200 table sets both from 128 to 512 rows per expert.

  `bf16_rows`: GEMM2's weighted rows stored as bfloat16 (each rounded once from its float32 sum) instead of
  float32, for the combine to read half the bytes; the combine still sums them in float32. The rows are
  rounded before the sum instead of only the sum after it: ~1e-3 relative, against SPEC.md's 3.5e-2 bound of
  the FP8 intermediate (with GEMM2's split-K, each K range's partial row is rounded). The H200 table sets
  it at every T.

  `chain_items`: with the Mosaic GEMMs, each persistent CTA's work items as one chained TMA pipeline
  (`mosaic_gemm`'s chain_items: the next item's first K steps load while this item's last ones compute and
  its epilogue runs; the same bits). Measured on the H200 (experiments/PERF.md 37): no gain; no table sets it.

  `gemm_kernels`: which kernels run the two GEMMs (`GEMM_KERNELS`):
  - "triton": the Pallas-Triton kernels of `grouped_gemm`, with the tiles above.
  - "mosaic": both as the Mosaic GPU kernel of `mosaic_gemm` (Hopper: wgmma + TMA), with the rows gathered
    first and GEMM1's SwiGLU + quant as a kernel of its own; `gemm1`/`gemm2` then give only block_m
    (`mosaic_gemm.BLOCK_M`), GEMM1's quant block (block_n = 128) and each GEMM's group_m (the order of its
    persistent CTAs' work items), their other launch fields unused.
  - "mosaic_fused_swiglu": as "mosaic", with SwiGLU + quant in the Mosaic GEMM1's epilogue
    (`mosaic_gemm.grouped_fp8_gemm_swiglu`), run by the up warpgroup while the gate one waits.
  - "mosaic_fused_swiglu_split": as "mosaic_fused_swiglu", that epilogue split by columns over both compute
    warpgroups (`warpgroups="split"`: the same bits, GEMM1 0-1.6 % faster).
  - "mosaic_fused_swiglu_paired": as "mosaic_fused_swiglu", each compute warpgroup computing 64 columns of
    both up and gate (`warpgroups="paired"`: no branch per warpgroup around the wgmma, only the row amax exchanged
    in the epilogue; the same bits in interpret mode); the H200 table's choice above 128 rows per expert
    (GEMM1 6-10 % faster than "_split" at T >= 11948, experiments/PERF.md 44).
  """

  gemm1: GemmTiling = GemmTiling()
  gemm2: GemmTiling = GemmTiling()
  combine: CombineTiling = CombineTiling()
  gemm1_busy: GemmTiling | None = None
  busy_min_tiles: int = 0
  gemm_kernels: str = "triton"
  scales_in_gather: bool = False
  weights_in_gemm2: bool = False
  bf16_rows: bool = False
  chain_items: bool = False

  def __post_init__(self):
    if self.gemm_kernels not in GEMM_KERNELS:
      raise ValueError(f"gemm_kernels must be one of {GEMM_KERNELS}, got {self.gemm_kernels!r}")
    for name in ("scales_in_gather", "weights_in_gemm2", "chain_items"):
      if getattr(self, name) and not self.mosaic:
        raise ValueError(f"{name} needs the Mosaic GEMMs, got gemm_kernels={self.gemm_kernels!r}")
    if self.mosaic:
      from moe_pallas.kernels import mosaic_gemm  # Mosaic GPU imports: only where asked for
      blocks = (self.gemm1.block_m, self.gemm1.block_n, self.gemm1.split_k, self.gemm2.split_k,
                self.gemm1.k_unroll, self.gemm2.k_unroll, self.gemm1.swap_ab or self.gemm2.swap_ab)
      if blocks != (mosaic_gemm.BLOCK_M, SCALE_BLOCK, 1, 1, 1, 1, False) or self.gemm1_busy is not None:
        raise ValueError(f"gemm_kernels={self.gemm_kernels!r} needs block_m={mosaic_gemm.BLOCK_M}, "
                         f"gemm1.block_n={SCALE_BLOCK}, no split-K, no k_unroll, no swap_ab and no gemm1_busy; got "
                         f"(block_m, gemm1.block_n, split_k, gemm2 split_k, k_unroll, gemm2 k_unroll, swap_ab) = "
                         f"{blocks}, gemm1_busy={self.gemm1_busy}")
    if self.gemm2.stream_k:
      raise ValueError(f"stream_k is GEMM1's only, got gemm2.stream_k={self.gemm2.stream_k}")
    if self.gemm1.stream_k and (self.mosaic or self.gemm1_busy is not None):
      raise ValueError(f"gemm1.stream_k needs the Triton GEMMs and no gemm1_busy, got gemm_kernels="
                       f"{self.gemm_kernels!r}, gemm1_busy={self.gemm1_busy}")
    if self.gemm1_busy is not None:
      blocks = lambda g: (g.block_m, g.block_n, g.block_k, g.split_k)
      if blocks(self.gemm1_busy) != blocks(self.gemm1) or self.gemm1.split_k != 1:
        raise ValueError(f"gemm1_busy must have gemm1's blocks and no split-K (one output layout), got "
                         f"{blocks(self.gemm1_busy)} and {blocks(self.gemm1)}")
      # The device's count of used tiles picks the launch: with products of two orientations (two MMA
      # shapes that round the fp8 sums differently) a token's output would depend on the other tokens.
      if self.gemm1_busy.swap_ab != self.gemm1.swap_ab:
        raise ValueError(f"gemm1_busy.swap_ab must equal gemm1.swap_ab (a token's result must not depend on "
                         f"which launch the other tokens pick), got {self.gemm1_busy.swap_ab} and "
                         f"{self.gemm1.swap_ab}")
      if self.busy_min_tiles < 1:
        raise ValueError(f"busy_min_tiles must be >= 1 with a gemm1_busy, got {self.busy_min_tiles}")
    if self.gemm1.block_m != self.gemm2.block_m:
      raise ValueError(f"gemm1 and gemm2 share the tile schedule: block_m {self.gemm1.block_m} != "
                       f"{self.gemm2.block_m}")
    if self.gemm1.block_k != SCALE_BLOCK:
      raise ValueError(f"gemm1.block_k must be {SCALE_BLOCK} (the activations' scale block), got "
                       f"{self.gemm1.block_k}")

  @property
  def mosaic(self) -> bool:
    """Whether the GEMMs are the Mosaic GPU kernels."""
    return self.gemm_kernels != "triton"

  @property
  def block_m(self) -> int:
    return self.gemm1.block_m

  def with_triton_gemms(self) -> "MoETiling":
    """These tiles with the Pallas-Triton GEMMs (and so without the Mosaic path's options)."""
    return dataclasses.replace(self, gemm_kernels="triton", scales_in_gather=False, weights_in_gemm2=False,
                               chain_items=False)

  def check_intermediate(self, quantized: bool) -> None:
    """An FP8 SwiGLU output is quantized in 1 x gemm1.block_n blocks, so GEMM2 must step K by that block."""
    if quantized and self.gemm2.block_k != self.gemm1.block_n:
      raise ValueError(f"with an FP8 intermediate, gemm2.block_k must equal gemm1.block_n (the SwiGLU "
                       f"output's quantization block), got {self.gemm2.block_k} and {self.gemm1.block_n}")


def _h100_tiling(rows_per_expert: float) -> MoETiling:
  # Measured on H100 (experiments/check_kernels.py, GPU kernel times, uniform routing; 2026-11-25): GEMM1
  # (two 64x128 accumulators) is fastest with 8 warps at every T (T=80: 300 -> 271 us; T=14107: 3272 ->
  # 2483 us); GEMM2 with 64-wide N-tiles up to T=901 (135 vs 159 us there) and 128-wide, 4 warps above
  # (1005 us at T=14107 against 1155-1932 for the other variants). Narrower GEMM1 tiles force GEMM2's K
  # step down to 64, which cost GEMM2 more than they gained (T=16: 89 -> 112 us). 3 pipeline stages
  # for GEMM2 beat 4 and 5 at every T.
  gemm1 = GemmTiling(block_m=64, block_n=128, group_m=8, num_warps=8, num_stages=4)
  if rows_per_expert <= 512:
    return MoETiling(gemm1=gemm1, gemm2=GemmTiling(block_m=64, block_n=64, group_m=8, num_warps=4, num_stages=3))
  return MoETiling(gemm1=dataclasses.replace(gemm1, num_stages=3),
                   gemm2=GemmTiling(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=3))


def _h200_tiling(rows_per_expert: float) -> MoETiling:
  # Measured on H200 (experiments/tune_tiles.py on the benchmark's uniform draws, 2026-11-29; results in
  # experiments/results/h200_2026-11-29/tune1_tiles.jsonl). Up to 32 rows per expert (T <= 128 at
  # DeepSeek-V3's shape) 16-row tiles: GEMM1 with 8 warps, GEMM2 64-wide with 3 stages (T=16: GEMM1 124 -> 79 us,
  # GEMM2 42 -> 32; T=57: 230 -> 183, 95 -> 78; T=1: 49 -> 44, 17 -> 15). Narrower GEMM1 tiles
  # (32, 64) gain a few us on GEMM1 at T=1 but force GEMM2's K step down, which costs more there.
  # The combine with 8 x 256 programs: T=57 9.9 -> 4.8 us, T=16 6.3 -> 4.0, T=14107 232 -> 152.
  # Above, the H100 tiles stay best (T=901: 16- and 32-row variants were 3-16 % slower in sum; T=14107:
  # 128-row tiles 36 % slower).
  combine = CombineTiling(block_t=8, block_h=256)
  gemm2 = GemmTiling(block_m=16, block_n=64, group_m=8, num_warps=4, num_stages=3)
  if rows_per_expert <= 2:
    # Two experts touched at T=1 and T=7: GEMM1 in 4 K ranges (2026-11-30, tune2_tiles.jsonl): 48.3 -> 30.6
    # us at T=7 (split 2: 40.6, split 8: 33.5). GEMM2 in 2 K ranges, their partial rows summed by the
    # combine (h200_2026-11-30/tune3_tiles.jsonl and h200_2026-11-30_s6/tune13.jsonl, GEMM2 + combine):
    # T=1 17.4 -> 15.4 and 17.3 -> 15.7 us, T=7 17.9 -> 17.3 and 17.7 -> 17.3 (16 K steps of 128 are too
    # few for a program's pipeline to reach the weights' bandwidth).
    # GEMM1 as the stream-K kernel, one program per SM with 4 stages, in place of the 4 K ranges (2026-11-30,
    # h200_2026-11-30_s7/tune17.jsonl): T=1 30.3 -> 28.6 us, T=7 30.6 -> 29.3 (2 programs per SM: 31.4;
    # 5 stages: 30.0). From 8 experts up, stream-K lost to the programs per tile as often as it won
    # (T=16 80.8 -> 74.9, T=62 151.3 -> 141.3; T=14 113.7 -> 119.4, T=57 153.3 -> 165.3).
    # Its fix-up by the last-arriving program instead of a kernel, and GEMM2's (split-K) rows as bfloat16
    # (2026-11-30, h200_2026-11-30_s9/tune23.jsonl, kernel sums with the counters' memset): T=1 50.4 ->
    # 48.5 us, T=7 53.1 -> 51.6; rel-L2 2.22e-2 -> 2.23e-2 and 2.25e-2. The routing kernels write the
    # zeroed counters (PERF 33: no memset kernel).
    # GEMM2's products transposed (`swap_ab`; one launch, so the orientation is fixed; 2026-11-30,
    # h200_2026-11-30_s12/tune38.jsonl and call 7, PERF 52): T=1 12.7 -> 11.6 us, T=7 13.3 -> 12.6.
    # The combine keeps its masked 8 x 256 tile here: the branch per pick (PERF 54, tune42) was equal at
    # T=1 and 0.7 us less at T=7 in one call, too little to change a measured entry.
    return MoETiling(gemm1=GemmTiling(block_m=16, block_n=128, group_m=8, num_warps=8, num_stages=4, stream_k=1,
                                      fixup_in_kernel=True),
                     gemm2=dataclasses.replace(gemm2, split_k=2, swap_ab=True), combine=combine, bf16_rows=True)
  if rows_per_expert <= 32:
    # GEMM1's best launch depends on the experts touched: with 8 warps up to 14 experts (T=14: 116.5 ->
    # 114.7 us against 4 stages, T=32: 107.3 -> 95.7 and T=80: 112.0 -> 101.5 against 4 warps), with 4
    # warps from 18 (T=52/55/57, 18-20 experts: 188-190 -> 147-159 us). 16 tiles x 16 N-tiles = 256
    # programs, about two per SM, is the measured boundary.
    # The combine with 2 x 512 programs (2026-11-30, h200_2026-11-30_s6/tune10.jsonl): 1.0-1.3 us less at
    # T=14-80 (T=14 4.0 -> 2.9, T=55 4.8 -> 3.5, T=80 4.3 -> 3.6; 4 x 256 the same within 0.1 us). One
    # token x 1024 columns on 8 warps, each pick's row under a branch (2026-12-01, h200_2026-12-01_s13/
    # tune41.jsonl, PERF 54): 0.2-0.6 us less at each of T=14, 16, 32, 52, 55, 57, 80 (T=57 3.5 -> 2.9).
    # GEMM2 with each product transposed (2026-11-30, h200_2026-11-30_s11/tune37.jsonl, PERF 48): T=14 54.8
    # -> 52.7 us, T=16 31.8 -> 30.7, T=32 49.9 -> 42.8, T=52 78.0 -> 73.9, T=55 72.9 -> 70.1, T=57 77.8 ->
    # 72.9, T=80 51.0 -> 45.4. GEMM1 stays unswapped: transposed, the 8-warp launch gained 1-3 us (T=16 74.2
    # -> 72.3, T=32 95.2 -> 92.1, T=80 101.7 -> 100.6, T=14 112.9 -> 113.7) and the 4-warp busy launch lost
    # 9-12 (T=52 163.4 -> 172.3, T=55 154.7 -> 165.6, T=57 157.3 -> 169.2; s12/tune38.jsonl), and both
    # launches must compute alike (PERF 49). The busy launch with 2 stages (68 KB of SMEM: 3 programs an SM
    # instead of 2; the same sums; 2026-12-01, h200_2026-12-01_s13/call7/tune44.jsonl and call8/tune45.jsonl,
    # PERF 58): GEMM1 at T=55 -2.7 and -2.4 us, T=62 -6.6 and -4.1, T=52/57 within 1 (two calls). The 8-warp
    # launch keeps its 3 stages: with 2 it lost 8-25 us at T=14-80 (one program an SM there).
    # On today's kernels (since the block-major weight tiles, 3ff0092) the busy launch is faster with 3 stages
    # again, in both weight orders (2026-12-01, h200_2026-12-01_s17/call1/tune48 and call2/tune49, PERF 69;
    # GEMM1 us, block-major / SPEC order): T=52 150.3 -> 148.7 / 161.4 -> 159.9, T=55 138.3 -> 134.7 / 150.6 ->
    # 148.0, T=57 143.1 -> 140.5 / 155.7 -> 152.1, T=62 133.1 -> 129.3 / 144.8 -> 139.8 (call 1; calls 2 and 3
    # agree at T=55, 57 and 62, call 2 saw T=52 block-major unchanged); where it only exits (8-16 tiles used)
    # the same 2.2-3.1 us.
    return MoETiling(gemm1=GemmTiling(block_m=16, block_n=128, group_m=8, num_warps=8, num_stages=3),
                     gemm2=dataclasses.replace(gemm2, swap_ab=True),
                     combine=CombineTiling(block_t=1, block_h=1024, num_warps=8, branch_per_pick=True),
                     gemm1_busy=GemmTiling(block_m=16, block_n=128, group_m=8, num_warps=4, num_stages=3),
                     busy_min_tiles=17, bf16_rows=True)
  # GEMM2's rows as bfloat16 into the combine (2026-11-30, h200_2026-11-30_s8/tune20.jsonl, GEMM2 +
  # combine): T=14107 599.4 -> 528.4 us, T=11948 455.5 -> 408.7, T=901 133.5 -> 125.7, all_local T=14107
  # 4454 -> 3714, all_local T=901 338.0 -> 281.6; T=55 83.2 -> 78.5, T=16 35.5 -> 35.6. rel-L2 against
  # the float32 reference unchanged (2.3e-2). (At <= 2 rows per expert, above, with GEMM2's split-K partial
  # rows each rounded: measured in session 9.)
  # The combine with one token x 1024 columns a program, each pick's row under a branch (2026-12-01,
  # h200_2026-12-01_s13/tune41.jsonl, PERF 54): T=901 11.2 -> 8.6 us, T=11948 108.1 -> 87.0, T=14107
  # 128.6 -> 110.1 (most tokens there have 0 or 1 local pick of 8).
  tiles = dataclasses.replace(_h100_tiling(rows_per_expert), bf16_rows=True,
                              combine=CombineTiling(block_t=1, block_h=1024, branch_per_pick=True))
  if rows_per_expert > 512:
    # M-tile groups of 32 (2026-11-30, h200_2026-11-30/tune3_tiles.jsonl): the sum of GEMM1 + GEMM2 +
    # combine at T=11948 1759 -> 1709 us, at T=14107 2307 -> 2256 (group_m 16: 1724, 2263). The Mosaic
    # GEMMs below take it too (2026-12-01, h200_2026-12-01_s14/tune46.jsonl, PERF 61; they had ignored it):
    # kernel sums T=11948 1084.2 -> 1068.6 us, T=14107 1430.9 -> 1411.4, all_local T=14107 10262.9 ->
    # 10230.6 (group_m 16: 1075.2, 1418.4, 10178.7). At 225 rows per expert (T=901) 8 stays: 32 cost the
    # uniform draw 13 us (350.4 -> 363.4) and gained all_local 9 (813.3 -> 803.9).
    tiles = dataclasses.replace(tiles, gemm1=dataclasses.replace(tiles.gemm1, group_m=32),
                                gemm2=dataclasses.replace(tiles.gemm2, group_m=32))
  if rows_per_expert > _H200_MOSAIC_ABOVE_ROWS:
    # Both GEMMs as the Mosaic GPU kernel (2026-11-30, h200_2026-11-30_s4/tune4_tiles.jsonl, kernel sums
    # against the Triton tiles): T=901 480.5 -> 401.1 us, T=901 all_local 1330.0 -> 1019.3, T=11948
    # 1798.1 -> 1688.4, T=14107 2357.1 -> 2188.8 (GEMM1 1436 -> 1029). At T=80 (20 rows per expert by
    # this count) the Triton GEMMs stay: 164.8 against 191.9. The boundary between (T=512) is not measured.
    # With SwiGLU + quant in the Mosaic GEMM1's epilogue (2026-11-30, h200_2026-11-30_s5/tune5_tiles.jsonl,
    # kernel sums): T=901 406.8 -> 384.6 us, T=11948 1694.7 -> 1648.9, T=14107 2198.2 -> 2127.9, T=901
    # all_local 1025.5 -> 990.1 (GEMM1 3-4 % slower, the 17-103 us SwiGLU kernel gone). With the persistent
    # grid (h200_2026-11-30_s5/tune8_persistent.jsonl): 370.5, 1228.3, 1624.3 and 898.7 us; the unfused
    # Mosaic GEMM1 wins only at all_local T=14107 (11334 vs 11593). With that epilogue split by columns over
    # both warpgroups (h200_2026-11-30_s6/tune9.jsonl, GEMM1 alone): T=901 219.5 -> 219.8 us, T=11948
    # 664.1 -> 656.0, T=14107 886.2 -> 872.2, T=901 all_local 546.0 -> 539.1, all_local T=14107 7144 -> 7035.
    # With each compute warpgroup's 64 columns of both up and gate (2026-11-30, h200_2026-11-30_s11/tune34.jsonl,
    # GEMM1 alone, PERF 44): T=901 211.8 -> 211.0 us, T=11948 638.2 -> 596.7, T=14107 853.6 -> 798.6,
    # all_local T=14107 7045 -> 6369.
    tiles = dataclasses.replace(tiles, gemm_kernels="mosaic_fused_swiglu_paired")
  if _H200_MOSAIC_ABOVE_ROWS < rows_per_expert <= 512:
    # No XLA kernel on the Mosaic path (2026-11-30, h200_2026-11-30_s7/tune15.jsonl, kernel sums): the
    # weight scales laid out by the row gather and the routing weights multiplied in GEMM2, T=901 378.1 ->
    # 369.3 us, all_local T=901 927.8 -> 923.4. Not above: T=14107 1671.2 -> 1676.1 (the gather +4.6 us, GEMM2
    # +8 with its 16 K steps an item waiting on one more TMA each).
    tiles = dataclasses.replace(tiles, scales_in_gather=True, weights_in_gemm2=True)
  return tiles


_H200_MOSAIC_ABOVE_ROWS = 128  # rows per expert (T * top_k / E_local): T > 512 at DeepSeek-V3's shape


# device_kind substring -> tiles measured there. Other GPUs get the H100's (the first measured).
_TILINGS_BY_DEVICE = (("H200", _h200_tiling), ("H100", _h100_tiling))


def default_tiling(num_tokens: int, top_k: int, num_local_experts: int, device_kind: str | None = None,
                   hidden: int | None = None, intermediate: int | None = None) -> MoETiling:
  """Per-shape, per-device default (T is static under jit).

  Few rows per expert (memory-bound): short M-tiles and narrow GEMM2 N-tiles, so that the weights of a
  few touched experts are streamed by all SMs. Many rows (compute-bound): 64-row tiles, wider GEMM2 tiles.

  Args:
    device_kind: `jax.Device.device_kind` whose measured table applies; default: the first device's.
    hidden: H; GEMM1's split_k (measured at DeepSeek-V3's 56 K steps) becomes the largest divisor of
      H/128 that does not exceed it. None: as measured.
    intermediate: I; likewise GEMM2's split_k, a divisor of its I/block_k K steps (16 at DeepSeek-V3).
  """
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  rows_per_expert = num_tokens * top_k / max(num_local_experts, 1)
  tiling_for = next((table for name, table in _TILINGS_BY_DEVICE if name in device_kind), _h100_tiling)
  tiling = tiling_for(rows_per_expert)
  fit = lambda gemm, k: dataclasses.replace(gemm, split_k=max(d for d in range(1, gemm.split_k + 1)
                                                              if (k // gemm.block_k) % d == 0))
  if hidden is not None:
    tiling = dataclasses.replace(tiling, gemm1=fit(tiling.gemm1, hidden))
  if intermediate is not None:
    tiling = dataclasses.replace(tiling, gemm2=fit(tiling.gemm2, intermediate))
  return tiling
