"""The kernels lower to Triton IR at DeepSeek-V3's shape, on a machine without a GPU.

Interpret mode (the other kernel tests) runs the kernels' jnp semantics and never the Pallas-Triton
lowering, where unsupported operations fail (a `stack` of more than two arrays, a mixed index, ...).
Here every kernel of the layer is lowered for an abstract H100/H200 (`triton_internals.abstract_gpu`), the
program the GPU runs (not interpret mode's): its only custom calls are the kernels and nothing in it waits on
the host. Nothing is compiled or run, so speed and numerics stay the GPU run's business.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import pytest

import moe_pallas as mp
from moe_pallas.kernels import fused_routing, grouped_moe, schedule, tiling, triton_internals

CONFIG = mp.DEEPSEEK_V3
# The fused routing: `layout` folded into `place` while the blocks' counts fit one tile (T <= 1024), else three.
ROUTING_KERNELS = ["moe_route", "moe_layout_place"]
ROUTING_KERNELS_ONE_BLOCK = ["moe_route_layout_place"]  # T <= 2: one block of tokens, one program


def _routing_kernels(num_tokens):
  """The fused routing's kernels at DeepSeek-V3's shape up to one tile of blocks (T <= 1024)."""
  return ROUTING_KERNELS_ONE_BLOCK if num_tokens <= 2 else ROUTING_KERNELS
ROUTING_KERNELS_SEPARATE = ["moe_route", "moe_layout", "moe_place"]  # layout_in_place=False
ROUTING_KERNELS_PAST_ONE_TILE = ["moe_route", "moe_layout_sums", "moe_layout", "moe_place"]
MOSAIC_CALL, MOSAIC_GEMM = "mosaic_gpu_v2", "mosaic_gemm"
# The H200 table's Mosaic path: SwiGLU + quant in GEMM1's epilogue ("mosaic_fused_swiglu_paired"), no kernel of
# its own.
MOSAIC_EXPERTS = ["moe_gather_rows", MOSAIC_GEMM, MOSAIC_GEMM, "moe_combine"]


def _layer_shapes(num_tokens, config=CONFIG):
  c, sd = config, jax.ShapeDtypeStruct
  h, i, e, b = c.hidden, c.intermediate, c.num_local_experts, 128
  return (sd((num_tokens, c.num_experts), jnp.float32), sd((c.num_experts,), jnp.bfloat16),
          sd((num_tokens, h), jnp.float8_e4m3fn), sd((h // b, num_tokens), jnp.float32),
          sd((e, 2 * i, h), jnp.float8_e4m3fn), sd((e, 2 * i // b, h // b), jnp.float32),
          sd((e, h, i), jnp.float8_e4m3fn), sd((e, h // b, i // b), jnp.float32),
          sd((), jnp.int32), sd((), jnp.float32))


def _lowered_text(num_tokens, device_kind, tiles=None, **kwargs):
  tiles = tiles or tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts, device_kind=device_kind)
  layer = lambda *args: grouped_moe.moe_layer_triton(*args, config=CONFIG, tiling=tiles, **kwargs)
  with triton_internals.abstract_gpu(device_kind):
    return jax.jit(layer).trace(*_layer_shapes(num_tokens)).lower(lowering_platforms=("cuda",)).as_text()


def _lowered_kernels(num_tokens, device_kind, **kwargs):
  """The program's kernels in call order: Pallas-Triton ones by name, Mosaic GPU ones as "mosaic_gemm"."""
  text = _lowered_text(num_tokens, device_kind, **kwargs)
  assert text.count("__gpu$xla.gpu.triton") == len(re.findall(r'name = "moe_', text))
  # One device program: the kernels are its only custom calls, and nothing waits on the host.
  calls = re.findall(r"custom_call @([\w$.]+)", text)
  assert set(calls) <= {"__gpu$xla.gpu.triton", MOSAIC_CALL}, set(calls)
  for marker in ("callback", "host_compute", "infeed", "outfeed", "send", "recv"):
    assert marker not in text.lower(), marker
  triton_names = iter(re.findall(r'name = "(moe_[a-z0-9_]+)"', text))
  return [MOSAIC_GEMM if call == MOSAIC_CALL else next(triton_names) for call in calls]


@pytest.mark.parametrize("device_kind", ["NVIDIA H200", "NVIDIA H100 80GB HBM3"])
@pytest.mark.parametrize("num_tokens", [1, 57, 901])
def test_layer_lowers_with_fused_routing(num_tokens, device_kind):
  kernels = _lowered_kernels(num_tokens, device_kind)
  tiles = tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts, device_kind=device_kind)
  if tiles.mosaic:  # the H200 at T=901
    assert kernels == ROUTING_KERNELS + MOSAIC_EXPERTS
    return
  if tiles.gemm1.stream_k:  # the H200 at T=1 (its fix-up in the kernel: no second kernel)
    gemm1 = ["moe_gemm1_stream_k_fp8"] + ([] if tiles.gemm1.fixup_in_kernel else ["moe_gemm1_stream_k_fixup"])
  else:
    gemm1 = ["moe_gemm1_swiglu_fp8"] * (1 + (tiles.gemm1_busy is not None))  # the used-tile count picks one
  assert kernels == _routing_kernels(num_tokens) + gemm1 + ["moe_gemm2_fp8", "moe_combine"]
  if tiles.gemm1_busy is not None:  # the launch for fewer than busy_min_tiles has programs for those only
    grids = [int(g) for g in re.findall(r"grid_x = (\d+)", _lowered_text(num_tokens, device_kind))]
    num_n_tiles = CONFIG.intermediate // tiles.gemm1.block_n
    num_m_tiles = schedule.max_tiles(num_tokens * CONFIG.top_k, CONFIG.num_local_experts, tiles.block_m)
    assert grids[2:4] == [(tiles.busy_min_tiles - 1) * num_n_tiles, num_m_tiles * num_n_tiles]


def test_split_k_gemm1_lowers():
  """Split-K GEMM1 (two kernels: K-range partials, then their sum with SwiGLU + quant) and GEMM2 (partial rows
  that the combine sums), bf16 intermediate too."""
  split = tiling.MoETiling(gemm1=tiling.GemmTiling(block_m=16, num_warps=8, num_stages=4, split_k=8),
                           gemm2=tiling.GemmTiling(block_m=16, block_n=64, split_k=4))
  for intermediate, suffix in ((jnp.float8_e4m3fn, "fp8"), (jnp.bfloat16, "bf16")):
    kernels = _lowered_kernels(7, "NVIDIA H200", tiles=split, intermediate_dtype=intermediate)
    assert kernels == ROUTING_KERNELS + ["moe_gemm1_split_k", f"moe_gemm1_split_k_swiglu_{suffix}",
                                         f"moe_gemm2_{suffix}", "moe_combine"]


def test_small_calls_are_the_kernels_alone():
  """With the fused routing, the program is its kernels (six at T=57) and free reshapes: no XLA kernel of its own."""
  text = _lowered_text(57, "NVIDIA H200")
  main = text[text.index("func.func public @main"):]
  assert set(re.findall(r"= (stablehlo\.[a-z_]+)", main)) == {"stablehlo.custom_call", "stablehlo.reshape"}


@pytest.mark.parametrize("num_tokens", [1, 901])
def test_128_local_experts_lower_without_copies(num_tokens):
  """Two GPUs' share of DeepSeek-V3 (128 experts, W13 3.76 GB: int32 offsets would wrap): the weights go to
  the kernels whole, as at 32 experts (64-bit offsets), not sliced (a copy per call)."""
  config = dataclasses.replace(CONFIG, num_local_experts=128)
  tiles = tiling.default_tiling(num_tokens, config.top_k, 128, device_kind="NVIDIA H200")
  layer = lambda *args: grouped_moe.moe_layer_triton(*args, config=config, tiling=tiles)
  with triton_internals.abstract_gpu("NVIDIA H200"):
    text = jax.jit(layer).trace(*_layer_shapes(num_tokens, config)).lower(lowering_platforms=("cuda",)).as_text()
  main = text[text.index("func.func public @main"):]
  assert set(re.findall(r"= (stablehlo\.[a-z_]+)", main)) <= {"stablehlo.custom_call", "stablehlo.reshape"}


def test_fused_routing_lowers_past_one_layout_tile():
  """T=14107 asked for the fused routing: 7054 blocks of 2 tokens, laid out in 28 chunks of 256, a program
  each; `route` on one warp, the other routing kernels on four."""
  kernels = _lowered_kernels(14107, "NVIDIA H200", fused_routing_kernels=True)
  assert kernels == ROUTING_KERNELS_PAST_ONE_TILE + MOSAIC_EXPERTS
  text = _lowered_text(14107, "NVIDIA H200", fused_routing_kernels=True)
  warps = dict(re.findall(r'name = "(moe_[a-z_]+)", num_stages = \d+ : i32, num_warps = (\d+)', text))
  assert warps["moe_route"] == "1" and warps["moe_layout"] == warps["moe_place"] == "4", warps
  assert re.findall(r"grid_x = (\d+)", text)[:3] == ["7054", "28", "28"]


def test_layout_past_one_tile_lowers_as_a_program_per_chunk():
  """`route_and_schedule` at T=14107: route, the chunks' sums, the chunks' layout, place."""
  def schedule(logits, bias):
    return fused_routing.route_and_schedule(logits, bias, 2.5, 96, config=CONFIG,
                                            num_local_experts=CONFIG.num_local_experts, block_m=64)[0]
  with triton_internals.abstract_gpu("NVIDIA H200"):
    text = jax.jit(schedule).trace(*_layer_shapes(14107)[:2]).lower(lowering_platforms=("cuda",)).as_text()
  assert re.findall(r'name = "(moe_[a-z_]+)"', text) == ["moe_route", "moe_layout_sums", "moe_layout", "moe_place"]
  assert re.findall(r"grid_x = (\d+)", text)[1:3] == ["28", "28"]  # 7054 blocks of 2 tokens: 28 chunks of 256


@pytest.mark.parametrize("num_tokens", [901, 14107])
def test_large_calls_on_the_h200_run_the_mosaic_gemms(num_tokens):
  """Above 128 rows per expert (T > 512) the H200 table picks the Mosaic GPU GEMMs (wgmma + TMA): the rows gathered,
  GEMM1 with SwiGLU + quant in its epilogue, GEMM2, combine; lowered for cuda, the module holds FP8 wgmma."""
  assert tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts, device_kind="NVIDIA H200").mosaic
  routing_kernels = ROUTING_KERNELS if num_tokens <= 1024 else ROUTING_KERNELS_PAST_ONE_TILE
  assert _lowered_kernels(num_tokens, "NVIDIA H200") == routing_kernels + MOSAIC_EXPERTS
  assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in _lowered_text(num_tokens, "NVIDIA H200")
  triton_tiles = tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts,
                                       device_kind="NVIDIA H200").with_triton_gemms()
  assert _lowered_kernels(num_tokens, "NVIDIA H200", tiles=triton_tiles) == routing_kernels + [
      "moe_gemm1_swiglu_fp8", "moe_gemm2_fp8", "moe_combine"]


@pytest.mark.parametrize("num_tokens", [901, 14107])
def test_chained_mosaic_items_lower(num_tokens):
  """`MoETiling.chain_items`: both Mosaic GEMMs with each CTA's items as one chained pipeline lower for cuda
  (another module than the unchained one: the chain's START / STEADY / STOP branches)."""
  base = tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts, device_kind="NVIDIA H200")
  chained = dataclasses.replace(base, chain_items=True)
  routing_kernels = ROUTING_KERNELS if num_tokens <= 1024 else ROUTING_KERNELS_PAST_ONE_TILE
  assert _lowered_kernels(num_tokens, "NVIDIA H200", tiles=chained) == routing_kernels + MOSAIC_EXPERTS
  text = _lowered_text(num_tokens, "NVIDIA H200", tiles=chained)
  assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in text
  assert text != _lowered_text(num_tokens, "NVIDIA H200", tiles=base)


def test_unfused_mosaic_gemms_lower():
  """gemm_kernels="mosaic": GEMM1's float32 output, then SwiGLU + quant as a kernel of its own (lowered for cuda)."""
  tiles = dataclasses.replace(tiling.default_tiling(14107, CONFIG.top_k, CONFIG.num_local_experts,
                                                    device_kind="NVIDIA H200"), gemm_kernels="mosaic")
  kernels = _lowered_kernels(14107, "NVIDIA H200", tiles=tiles)
  assert kernels == ROUTING_KERNELS_PAST_ONE_TILE + ["moe_gather_rows", MOSAIC_GEMM, "moe_swiglu_fp8", MOSAIC_GEMM,
                                                     "moe_combine"]


@pytest.mark.parametrize("gemm_kernels", ["mosaic_fused_swiglu_split", "mosaic_fused_swiglu_paired"])
def test_fused_epilogue_variants_lower(gemm_kernels):
  """The fused GEMM1 with its epilogue split by columns over both warpgroups, or with each warpgroup's 64
  columns of up and gate (64-wide wgmmas on slices of the weight tiles): the same kernels (for cuda)."""
  tiles = dataclasses.replace(tiling.default_tiling(14107, CONFIG.top_k, CONFIG.num_local_experts,
                                                    device_kind="NVIDIA H200"), gemm_kernels=gemm_kernels)
  assert _lowered_kernels(14107, "NVIDIA H200", tiles=tiles) == ROUTING_KERNELS_PAST_ONE_TILE + MOSAIC_EXPERTS
  if gemm_kernels == "mosaic_fused_swiglu_paired":
    assert "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3" in _lowered_text(14107, "NVIDIA H200", tiles=tiles)


@pytest.mark.parametrize("flags,xla_ops", [
    (dict(scales_in_gather=False, weights_in_gemm2=False), {"stablehlo.multiply", "stablehlo.transpose",
                                                            "stablehlo.pad"}),
    (dict(scales_in_gather=True, weights_in_gemm2=False), {"stablehlo.multiply"}),
    (dict(scales_in_gather=False, weights_in_gemm2=True), {"stablehlo.transpose", "stablehlo.pad"}),
    (dict(scales_in_gather=True, weights_in_gemm2=True), set()),
], ids=["neither", "scales_in_gather", "weights_in_gemm2", "both (the H200 table at T=901)"])
def test_mosaic_path_lowers_without_xla_kernels(flags, xla_ops):
  """At T=901: the same kernels; `scales_in_gather` takes the weight scales' transpose and pad out of XLA's
  part of the program, `weights_in_gemm2` the routing-weight multiply; with both, no XLA kernel is left."""
  tiles = dataclasses.replace(tiling.default_tiling(901, CONFIG.top_k, CONFIG.num_local_experts,
                                                    device_kind="NVIDIA H200"), **flags)
  assert _lowered_kernels(901, "NVIDIA H200", tiles=tiles) == ROUTING_KERNELS + MOSAIC_EXPERTS
  text = _lowered_text(901, "NVIDIA H200", tiles=tiles)
  main = text[text.index("func.func public @main"):]
  computing = {"stablehlo.transpose", "stablehlo.pad", "stablehlo.multiply"}
  assert set(re.findall(r"= (stablehlo\.[a-z_]+)", main)) & computing == xla_ops


@pytest.mark.parametrize("layout_in_place", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 2, 57, 901])
def test_fused_routing_kernels_lower(num_tokens, layout_in_place):
  """`route_and_schedule`: route, then layout + place as one kernel (the default; for one block of tokens, T <= 2,
  all three in one) or two (lowered for cuda)."""
  def schedule(logits, bias):
    return fused_routing.route_and_schedule(logits, bias, 2.5, 96, config=CONFIG,
                                            num_local_experts=CONFIG.num_local_experts, block_m=16,
                                            layout_in_place=layout_in_place)[0]
  shapes = _layer_shapes(num_tokens)[:2]
  with triton_internals.abstract_gpu("NVIDIA H200"):
    text = jax.jit(schedule).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  expected = _routing_kernels(num_tokens) if layout_in_place else ROUTING_KERNELS_SEPARATE
  assert re.findall(r'name = "(moe_[a-z_]+)"', text) == expected


def test_large_calls_route_with_xla():
  num_tokens = fused_routing.MAX_FUSED_PAIRS // mp.DEEPSEEK_V3.top_k + 1  # the first T above the fused limit
  kernels = _lowered_kernels(num_tokens, "NVIDIA H200")
  assert kernels == MOSAIC_EXPERTS


@pytest.mark.parametrize("fixup_in_kernel", [False, True])
@pytest.mark.parametrize("num_tokens", [1, 14, 80])
def test_stream_k_gemm1_lowers(num_tokens, fixup_in_kernel):
  """`GemmTiling.stream_k`: GEMM1 as the stream-K kernel and its fix-up (for cuda), or with the fix-up in the
  kernel (its barrier and atomic lower); each piece's K loop an scf.for, which Triton pipelines."""
  base = tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts, device_kind="NVIDIA H200")
  gemm1 = dataclasses.replace(base.gemm1, split_k=1, stream_k=2, fixup_in_kernel=fixup_in_kernel)
  tiles = dataclasses.replace(base, gemm1=gemm1, gemm1_busy=None, busy_min_tiles=0)
  kernels = _lowered_kernels(num_tokens, "NVIDIA H200", tiles=tiles)
  routing = _routing_kernels(num_tokens)
  fixup = [] if fixup_in_kernel else ["moe_gemm1_stream_k_fixup"]
  assert kernels == routing + ["moe_gemm1_stream_k_fp8", *fixup, "moe_gemm2_fp8", "moe_combine"]
  text = _lowered_text(num_tokens, "NVIDIA H200", tiles=tiles)
  assert re.findall(r"grid_x = (\d+)", text)[len(routing)] == "264"  # 2 programs per SM of the H200's 132


@pytest.mark.parametrize("num_tokens", [1, 57])
def test_swap_ab_lowers(num_tokens):
  """`GemmTiling.swap_ab` on every Triton GEMM launch of the H200 table (T=1: the stream-K GEMM1 and the
  split-K GEMM2; T=57: both GEMM1 launches and GEMM2): the same kernels, each a different module."""
  base = tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts, device_kind="NVIDIA H200")
  swapped = lambda g: None if g is None else dataclasses.replace(g, swap_ab=True)
  tiles = dataclasses.replace(base, gemm1=swapped(base.gemm1), gemm2=swapped(base.gemm2),
                              gemm1_busy=swapped(base.gemm1_busy))
  assert _lowered_kernels(num_tokens, "NVIDIA H200", tiles=tiles) == _lowered_kernels(num_tokens, "NVIDIA H200")
  assert _lowered_text(num_tokens, "NVIDIA H200", tiles=tiles) != _lowered_text(num_tokens, "NVIDIA H200")


def test_bf16_intermediate_lowers():
  kernels = _lowered_kernels(16, "NVIDIA H200", intermediate_dtype=jnp.bfloat16)
  assert kernels == ROUTING_KERNELS + ["moe_gemm1_swiglu_bf16"] * 2 + ["moe_gemm2_bf16", "moe_combine"]


def test_bf16_intermediate_at_t901_falls_back_to_the_triton_gemms(monkeypatch):
  """The H200 table picks the Mosaic GEMMs (with their in-kernel options) at T=901; with no tiling given, a bf16
  intermediate, which the Mosaic GEMM2 does not take, runs the Triton GEMMs instead."""
  monkeypatch.setattr(grouped_moe, "default_tiling", functools.partial(tiling.default_tiling,
                                                                       device_kind="NVIDIA H200"))
  assert tiling.default_tiling(901, CONFIG.top_k, CONFIG.num_local_experts, device_kind="NVIDIA H200").mosaic
  layer = lambda *args: grouped_moe.moe_layer_triton(*args, config=CONFIG, intermediate_dtype=jnp.bfloat16)
  with triton_internals.abstract_gpu("NVIDIA H200"):
    text = jax.jit(layer).trace(*_layer_shapes(901)).lower(lowering_platforms=("cuda",)).as_text()
  assert re.findall(r'name = "(moe_[a-z0-9_]+)"', text) == ROUTING_KERNELS + [
      "moe_gemm1_swiglu_bf16", "moe_gemm2_bf16", "moe_combine"]
  assert MOSAIC_CALL not in text


def test_abstract_gpu_rejects_unknown_devices():
  with pytest.raises(ValueError, match="not a GPU that Pallas-Triton knows"):
    with triton_internals.abstract_gpu("cpu"):
      pass


@pytest.mark.parametrize("num_tokens", [1, 57, 901])
def test_block_major_weights_lower(num_tokens):
  """The H200 table's kernels on block-major weights (`moe_pallas.weight_layout`: the stream-K and two-launch
  Triton GEMMs, the Mosaic GEMMs' TMA over 128 x 128 blocks): the same kernels as on [E, N, K] weights."""
  shapes = list(_layer_shapes(num_tokens))
  for index in (4, 6):  # gemm1_weights, gemm2_weights
    e, n, k = shapes[index].shape
    shapes[index] = jax.ShapeDtypeStruct((e, n // 128, k // 128, 128, 128), jnp.float8_e4m3fn)
  tiles = tiling.default_tiling(num_tokens, CONFIG.top_k, CONFIG.num_local_experts, device_kind="NVIDIA H200")
  layer = lambda *args: grouped_moe.moe_layer_triton(*args, config=CONFIG, tiling=tiles)
  with triton_internals.abstract_gpu("NVIDIA H200"):
    text = jax.jit(layer).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  names = lambda t: re.findall(r'name = "(moe_[a-z0-9_]+)"', t)
  assert names(text) == names(_lowered_text(num_tokens, "NVIDIA H200"))
  assert text.count(MOSAIC_CALL) == _lowered_text(num_tokens, "NVIDIA H200").count(MOSAIC_CALL)
