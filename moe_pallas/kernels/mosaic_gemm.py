"""FP8 block-scale grouped GEMM for Hopper as a Pallas Mosaic GPU kernel (wgmma + TMA + warp specialization).

    out[r, n] (float32) = sum_kb (a[r, kb] @ w[e(r), n, kb]) * a_scale[kb, r] * w_scale[e(r), n // 128, kb]

over rows already sorted by expert and padded to whole M-tiles of one expert (schedule.py): `e(r)` is
`tile_expert[r // block_m]`, and a tile of no expert (`tile_expert >= E_local`) exits at once, writing
nothing, so an expert no token picked costs no weight reads. Both operands are K-major (FP8 wgmma takes
only K-major operands, which our [E, N, K] expert weights are).

Why a second backend: Pallas-Triton's FP8 block-scaled loop tops out at ~550-600 TFLOP/s on the H200 at
large T (PERF.md); this structure (DeepGEMM's) measured 989 TFLOP/s as a dense 4096x4096x7168 GEMM
(`experiments/mosaic_fp8_probe.py`, results/h200_2026-11-30_s4/mosaic.txt).

Structure: a persistent grid, one CTA per SM, each looping over work items (M-tile, 256 columns) of the
tiles in use only (`used_tiles`, a device-side count: with uniform routing 87 % of the worst-case tiles
are unused at T=14107, and a CTA of ~200 KB of SMEM that exits at once still held an SM for a launch),
in groups of `group_m` M-tiles per column sweep (weight tiles shared while in L2). Per work item:
- one TMA producer warpgroup and two compute warpgroups (`plgpu.emit_pipeline_warp_specialized`); compute
  warpgroup g owns columns g*128 .. g*128+127 of the CTA tile, both read the same activation tile.
- the pipeline moves, per 128-wide K step: the activation tile (block_m, 128) and the weight tile
  (256, 128), both tiled + 128-byte swizzled; the tile's activation scales (1, block_m); and one row of the
  expert's transposed weight scales, padded to 128 bytes (TMA writes SMEM at 128-byte alignment).
- per K step and compute warpgroup: one wgmma (block_m, 128) x (128, 128)^T into a fresh accumulator, read
  back, then promoted on a float32 register carry: carry += product * (a_scale rows * w_scale) (the
  block scales applied once per K step, as DeepGEMM does: Hopper's FP8 wgmma accumulates a K step in
  reduced precision, the carry in full float32).
- epilogue: the carry goes out in (block_m, 64) float32 (or bfloat16) chunks through SMEM + TMA.

Runs compiled on Hopper (sm_90a) and in Mosaic GPU's interpret mode on CPU (how CI tests it).
"""

from __future__ import annotations


import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moe_pallas import weight_layout
from moe_pallas.config import SCALE_BLOCK
from moe_pallas.kernels import schedule
from moe_pallas.kernels.swiglu_quant import quantized_rows, silu

BLOCK_M = 64                 # rows per M-tile: one wgmma M of 64 per compute warpgroup
CTA_N = 2 * SCALE_BLOCK      # two compute warpgroups of 128 columns (one weight-scale block each)
_EPILOGUE_N = 64             # columns per epilogue store (float32 SMEM: 2 x 64 x 64 x 4 bytes)
_PRODUCER_REGISTERS = 40     # the TMA warpgroup's registers; the compute warpgroups get the rest
_MAX_CONCURRENT_STEPS = 4    # pipeline stages: 4 x ~40 KiB + the epilogue's 32 KiB fit the 227 KiB of SMEM
DEFAULT_GROUP_M = 8          # M-tiles visited together per column sweep (as the Triton kernels' group_m)
_HALF = SCALE_BLOCK // 2     # a compute warpgroup's columns of a 128-column block (the split and paired GEMM1)


def supports(n: int, k: int, block_m: int) -> str | None:
  """None when the kernel covers an [*, K] x [E, N, K] product with M-tiles of block_m; else why not."""
  if block_m != BLOCK_M:
    return f"block_m must be {BLOCK_M}, got {block_m}"
  if n % CTA_N:
    return f"N must be a multiple of {CTA_N}, got {n}"
  if k % SCALE_BLOCK:
    return f"K must be a multiple of {SCALE_BLOCK}, got {k}"
  return None


def _interpret_params(interpret):
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return interpret or None


def _fp8_transforms():
  swizzle = plgpu.find_swizzle(SCALE_BLOCK * 8)  # 128 FP8 values a row: 128 bytes
  return plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle)


def weight_scale_cols(w_scale_shape) -> int:
  """C of `weight_scale_rows`: N/128 rounded up to 32 float32, a 128-byte row."""
  return -(-w_scale_shape[1] // 32) * 32


def weight_scale_rows(w_scale):
  """[E, N/128, K/128] -> [E, K/128, C] with C = N/128 padded to 32 float32 (`weight_scale_cols`), zeros past
  N/128: one 128-byte row per K step through the pipeline (TMA writes SMEM at 128-byte alignment; a 16-byte
  row put the second stage off). XLA does it as a kernel per weight; `grouped_gemm.gather_rows` can instead
  (`transposed_scales`), in the programs of the row gather that runs before GEMM1."""
  cols = weight_scale_cols(w_scale.shape)
  return jnp.pad(jnp.swapaxes(w_scale, 1, 2), ((0, 0), (0, 0), (0, cols - w_scale.shape[1])))


def _scale_rows_operand(w_scale, w_scale_rows):
  """The weight scales as the kernel reads them: `w_scale_rows` if the caller laid them out (checked), else
  laid out here."""
  if w_scale_rows is None:
    return weight_scale_rows(w_scale)
  want = (w_scale.shape[0], w_scale.shape[2], weight_scale_cols(w_scale.shape))
  if w_scale_rows.shape != want or w_scale_rows.dtype != jnp.float32:
    raise ValueError(f"w_scale_rows must be weight_scale_rows(w_scale): float32{list(want)}, got "
                     f"{w_scale_rows.dtype}{list(w_scale_rows.shape)}")
  return w_scale_rows


def _promoted_k_step(carry, a_scale_smem, weight_scale, issue_wgmma, row_factor_smem=None):
  """One K step of a compute warpgroup: `issue_wgmma(acc_ref)` into a fresh accumulator (zero-initialised:
  the wgmma runs with scale-d = 0), read back, and added to the float32 carry times the step's scales (the
  activation scales times `row_factor_smem`'s, where given: the routing weights)."""
  # The scale loads first, so that their latency overlaps the wgmma.
  row_scale = plgpu.load(a_scale_smem.at[0], layout=plgpu.Layout.WGMMA.reduce(1))
  if row_factor_smem is not None:
    row_scale = row_scale * plgpu.load(row_factor_smem.at[0], layout=plgpu.Layout.WGMMA.reduce(1))
  factor = lax.broadcast_in_dim(row_scale * weight_scale, (BLOCK_M, SCALE_BLOCK), [0])

  def product(acc_ref):
    issue_wgmma(acc_ref)
    return acc_ref[...]

  return carry + pl.run_scoped(product, plgpu.ACC((BLOCK_M, SCALE_BLOCK), jnp.float32)) * factor


def _paired_k_step(carries, wg, a_smem, up_smem, gate_smem, a_scale_smem, weight_scales):
  """`grouped_fp8_gemm_swiglu(warpgroups="paired")`'s K step on compute warpgroup wg: columns wg*64 .. of the up and
  the gate tile, one 64-wide wgmma each into fresh accumulators, promoted as `_promoted_k_step` does (each
  half with its own 128 x 128 weight-scale block: up's, gate's)."""
  row_scale = plgpu.load(a_scale_smem.at[0], layout=plgpu.Layout.WGMMA.reduce(1))
  cols = pl.ds(wg * _HALF, _HALF)

  def products(up_acc, gate_acc):
    plgpu.wgmma(up_acc, a_smem, up_smem.at[cols].transpose((1, 0)))
    plgpu.wgmma(gate_acc, a_smem, gate_smem.at[cols].transpose((1, 0)))
    return up_acc[...], gate_acc[...]

  acc_type = plgpu.ACC((BLOCK_M, _HALF), jnp.float32)
  up, gate = pl.run_scoped(products, acc_type, acc_type)
  factor = lambda weight_scale: lax.broadcast_in_dim(row_scale * weight_scale, (BLOCK_M, _HALF), [0])
  return carries[0] + up * factor(weight_scales[0]), carries[1] + gate * factor(weight_scales[1])


def _concurrent_steps(k_steps: int) -> int:
  return min(_MAX_CONCURRENT_STEPS, k_steps)


def _weight_spec(rows: int, block_major: bool):
  """The pipeline's block of one weight operand a K step: (rows, 128) of an item's [rows, K] view; or, of
  block-major weights (`_weight_operand`, `_weight_view`), one 128 x 128 block of a [K/128 * 128, 128] view
  (rows = 128) or rows/128 such blocks of a [rows/128, K/128 * 128, 128] view, each a contiguous 16 KB in HBM."""
  fp8 = _fp8_transforms()
  if not block_major:
    return plgpu.BlockSpec((rows, SCALE_BLOCK), lambda kb: (0, kb), transforms=fp8)
  if rows == SCALE_BLOCK:
    return plgpu.BlockSpec((SCALE_BLOCK, SCALE_BLOCK), lambda kb: (kb, 0), transforms=fp8)
  return plgpu.BlockSpec((rows // SCALE_BLOCK, SCALE_BLOCK, SCALE_BLOCK), lambda kb: (0, kb, 0), transforms=fp8)


def _weight_operand(w):
  """The kernels' weight operand: [E, N, K] as given, block-major [E, N/128, K/128, 128, 128] as the free
  reshape [E, N/128, K/128 * 128, 128] (block (n, k) = rows k*128 .. of the [n] slice)."""
  if not weight_layout.is_block_major(w):
    return w
  e, nb, kb, _, _ = w.shape
  return w.reshape(e, nb, kb * SCALE_BLOCK, SCALE_BLOCK)


def _weight_view(w_gmem, expert, row0, rows: int, block_major: bool):
  """An item's weight operand of `rows` rows from row0 (a multiple of 128 where block-major; rows 128 or 256)."""
  if not block_major:
    return w_gmem.at[expert, pl.ds(row0, rows)]
  if rows == SCALE_BLOCK:
    return w_gmem.at[expert, row0 // SCALE_BLOCK]
  return w_gmem.at[expert, pl.ds(row0 // SCALE_BLOCK, rows // SCALE_BLOCK)]


def _tile_pipeline(step, compute_context, *, k_steps, weight_rows, weight_scale_cols, row_factor=False,
                   pipeline_state=None, block_major=False):
  """The warp-specialized K pipeline of one work item: per K step the activation tile, each weight tile
  (rows x 128), the activation scales, with `row_factor` the tile's row factors (the same block every step),
  and the weight-scale row go to SMEM by TMA, and `step(_, a, *weights, a_scale, [row_factor,]
  weight_scale_row, carry)` runs on each compute warpgroup. `pipeline_state` (plgpu.PipelinePipeline, or an
  int32 array of one) chains the items of a CTA into one pipeline (`_over_used_items`' chain_items)."""
  fp8 = _fp8_transforms()
  return plgpu.emit_pipeline_warp_specialized(
      step,
      grid=(k_steps,),
      memory_registers=_PRODUCER_REGISTERS,
      in_specs=[
          plgpu.BlockSpec((BLOCK_M, SCALE_BLOCK), lambda kb: (0, kb), transforms=fp8),
          *[_weight_spec(rows, block_major) for rows in weight_rows],
          plgpu.BlockSpec((1, BLOCK_M), lambda kb: (kb, 0)),
          # The row factors: the same block every step, fetched with each (the warp-specialized pipeline
          # takes only blocks whose index uses the step, hence kb * 0).
          *([plgpu.BlockSpec((1, BLOCK_M), lambda kb: (kb * 0, 0))] if row_factor else []),
          plgpu.BlockSpec((1, weight_scale_cols), lambda kb: (kb, 0)),
      ],
      wg_axis="wg",
      num_compute_wgs=2,
      max_concurrent_steps=_concurrent_steps(k_steps),
      compute_context=compute_context,
      pipeline_state=pipeline_state,
  )


def chains_items(k_steps: int) -> bool:
  """Whether `chain_items` can chain work items of k_steps K steps (Pallas chains pipelines whose step count
  is a multiple of their concurrent steps); where not, the kernels run each item's pipeline on its own."""
  return k_steps % _concurrent_steps(k_steps) == 0


def _over_used_items(used_tiles_gmem, num_tiles, n_blocks, tile_operands, *, k_steps, weight_rows, group_m,
                     row_factor=False, chain_items=False, block_major=False):
  """Decorator: runs `item(mi, ni, run_pipeline)` for every work item (M-tile mi < the device-side count of
  used tiles, column block ni < n_blocks), spread over the persistent grid's CTAs ("sm"), in groups of
  group_m M-tiles per column sweep (the CTAs running at once then share weight tiles in the L2).
  `run_pipeline(step, compute_context, runs, *tile_operands)` runs the item's K pipeline (if `runs`) in
  SMEM allocated once for all items; `tile_operands` are one item's operand views, which fix those
  allocations' shapes.

  chain_items: a CTA's items as one chained pipeline (`plgpu.PipelinePipeline`: START, STEADY..., STOP; a
  CTA of one item runs it alone): the TMA warpgroup loads the next item's first K steps as soon as this
  item's last ones are consumed, while the compute warpgroups finish and run the epilogue, instead of
  every item starting from an empty pipeline. Every item must then run (`runs` is not consulted: a skipped
  item would break the chain's barrier sequence), so the caller passes operands of a valid expert for
  every item (the used tiles all have one). Where `chains_items(k_steps)` is False, items run unchained.
  """
  chain_items = chain_items and chains_items(k_steps)
  weight_scale_cols = tile_operands[-1].shape[1]
  ignore = lambda *_, **__: None  # the allocations do not depend on the step or the context
  pipeline_of = functools.partial(_tile_pipeline, k_steps=k_steps, weight_rows=weight_rows,
                                  weight_scale_cols=weight_scale_cols, row_factor=row_factor,
                                  block_major=block_major)
  allocations = pipeline_of(ignore, ignore).get_allocations(*tile_operands)

  def decorate(item):
    @functools.partial(pl.run_scoped, allocations=allocations, collective_axes="wg")
    def _(allocations):
      used = jnp.minimum(used_tiles_gmem[0], num_tiles)

      @plgpu.nd_loop((used * n_blocks,), collective_axes="sm")
      def _(loop_info):
        (index,) = loop_info.index
        mi, ni = schedule.grouped_coordinates(index, used, n_blocks, group_m)

        def run_pipeline(step, compute_context, runs, *operands):
          run = lambda state=None: pipeline_of(step, compute_context, pipeline_state=state)(
              *operands, allocations=allocations)
          if not chain_items:
            pl.when(runs)(run)
            return
          first = loop_info.local_index == 0
          last = loop_info.local_index == loop_info.num_local_steps - 1
          states = plgpu.PipelinePipeline
          state = jnp.where(first, int(states.START), jnp.where(last, int(states.STOP), int(states.STEADY)))
          pl.when(first & last)(run)  # the CTA's only item: a pipeline of its own
          pl.when(~(first & last))(lambda: run(state.astype(jnp.int32)))

        item(mi, ni, run_pipeline)
    return item
  return decorate


def grouped_fp8_gemm(tile_expert, a, a_scale, w, w_scale, *, used_tiles=None, name: str = "moe_gemm_mosaic",
                     interpret=False, w_scale_rows=None, row_factor=None, out_dtype=jnp.float32, chain_items=False,
                     group_m: int = DEFAULT_GROUP_M):
  """Grouped block-scaled `a @ w[e].T` per M-tile of `BLOCK_M` rows, float32 (or bfloat16) out.

  Args:
    tile_expert: [num_tiles] int32: each M-tile's local expert (E_local for tiles of no expert).
    a: [num_tiles * BLOCK_M, K] float8_e4m3fn, rows sorted by expert (padding rows any finite value).
    a_scale: [K/128, num_tiles * BLOCK_M] float32 (1 x 128 blocks, the public transposed layout).
    w: [E_local, N, K] float8_e4m3fn, or block-major ([E_local, N/128, K/128, 128, 128],
      `moe_pallas.weight_layout`: each 128-row weight tile's K step one contiguous TMA box); w_scale:
      [E_local, N/128, K/128] float32 (128 x 128 blocks).
    used_tiles: [] int32, the number of leading tiles that belong to an expert (the schedule's
      `num_used_tiles`: the used tiles come first); the CTAs visit only those. None: all tiles.
    name: the kernel's name (what profiles show).
    interpret: True runs Mosaic GPU's interpret mode (CPU).
    w_scale_rows: `weight_scale_rows(w_scale)` where the caller has it (laid out by another kernel); None:
      laid out here (an XLA kernel before this one).
    row_factor: optional [num_tiles * BLOCK_M] float32, multiplied into each row's activation scales (GEMM2:
      the routing weights), the same bits as passing `a_scale * row_factor`, without an XLA kernel for it.
    out_dtype: float32, or bfloat16 (the float32 carry rounded once as it is stored: half the bytes for a
      consumer that reads the rows back, such as the combine).
    chain_items: each CTA's work items as one chained TMA pipeline (`_over_used_items`; the same bits). Needs
      used_tiles (every item visited is then a used tile, whose expert is valid).
    group_m: M-tiles whose items for one column block run one after another (the order of the work items
      only: the same bits).

  Returns:
    [num_tiles * BLOCK_M, N] out_dtype. Rows of tiles of no expert are left unwritten.
  """
  num_rows, k = a.shape
  num_local, n, k_w = weight_layout.logical_shape(w)
  block_major = weight_layout.is_block_major(w)
  num_tiles = tile_expert.shape[0]
  if k != k_w:
    raise ValueError(f"a has K={k} but w has K={k_w}")
  if num_rows != num_tiles * BLOCK_M:
    raise ValueError(f"a has {num_rows} rows, expected num_tiles * {BLOCK_M} = {num_tiles * BLOCK_M}")
  if (why := supports(n, k, BLOCK_M)) is not None:
    raise ValueError(why)
  if a_scale.shape != (k // SCALE_BLOCK, num_rows) or w_scale.shape != (num_local, n // SCALE_BLOCK,
                                                                         k // SCALE_BLOCK):
    raise ValueError(f"scale shapes {a_scale.shape} and {w_scale.shape} do not match a {a.shape} and w {w.shape}")
  if row_factor is not None and (row_factor.shape != (num_rows,) or row_factor.dtype != jnp.float32):
    raise ValueError(f"row_factor must be [rows] = [{num_rows}] float32, got {row_factor.dtype}"
                     f"{list(row_factor.shape)}")
  if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"out_dtype must be float32 or bfloat16, got {jnp.dtype(out_dtype)}")
  k_steps = k // SCALE_BLOCK
  w_scale_rows = _scale_rows_operand(w_scale, w_scale_rows)
  out_bytes = jnp.dtype(out_dtype).itemsize
  out_swizzle = plgpu.find_swizzle(_EPILOGUE_N * 8 * out_bytes)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // out_bytes)), plgpu.SwizzleTransform(out_swizzle))
  factored = row_factor is not None
  _check_item_order(chain_items, used_tiles, group_m)

  def kernel(tile_expert_gmem, used_tiles_gmem, a_gmem, a_scale_gmem, w_gmem, w_scale_gmem, *refs):
    row_factor_gmem, out_gmem, out_smem = refs if factored else (None, *refs)
    wg = lax.axis_index("wg")  # compute warpgroup g: columns g*128 .. of the CTA's 256
    operands = lambda mi, ni, expert: (
        a_gmem.at[pl.ds(mi * BLOCK_M, BLOCK_M)], _weight_view(w_gmem, expert, ni * CTA_N, CTA_N, block_major),
        a_scale_gmem.at[:, pl.ds(mi * BLOCK_M, BLOCK_M)],
        *([row_factor_gmem.at[:, pl.ds(mi * BLOCK_M, BLOCK_M)]] if factored else []), w_scale_gmem.at[expert])

    @_over_used_items(used_tiles_gmem, num_tiles, n // CTA_N, operands(0, 0, 0), k_steps=k_steps,
                      weight_rows=[CTA_N], group_m=group_m, row_factor=factored, chain_items=chain_items,
                      block_major=block_major)
    def _(mi, ni, run_pipeline):
      expert = _item_expert(tile_expert_gmem, mi, num_local, chain_items)

      def compute_context(eval_pipeline):
        zero = plgpu.layout_cast(jnp.zeros((BLOCK_M, SCALE_BLOCK), jnp.float32), plgpu.Layout.WGMMA)
        acc = eval_pipeline(zero)
        for e in range(SCALE_BLOCK // _EPILOGUE_N):
          out_smem[wg] = acc[:, e * _EPILOGUE_N:(e + 1) * _EPILOGUE_N].astype(out_smem.dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              out_smem.at[wg],
              out_gmem.at[pl.ds(mi * BLOCK_M, BLOCK_M),
                          pl.ds(ni * CTA_N + wg * SCALE_BLOCK + e * _EPILOGUE_N, _EPILOGUE_N)])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      def step(_, a_smem, w_smem, a_scale_smem, *rest):
        *row_factor_smem, w_scale_smem, carry = rest
        w_rows = w_smem.at[wg] if block_major else w_smem.at[pl.ds(wg * SCALE_BLOCK, SCALE_BLOCK)]
        w_tile = w_rows.transpose((1, 0))
        return _promoted_k_step(carry, a_scale_smem, w_scale_smem[0, ni * 2 + wg],
                                lambda acc_ref: plgpu.wgmma(acc_ref, a_smem, w_tile), *row_factor_smem)

      run_pipeline(step, compute_context, expert < num_local, *operands(mi, ni, expert))

  return _persistent_call(
      kernel, name=name, out_type=jax.ShapeDtypeStruct((num_rows, n), out_dtype),
      scratch_types=[plgpu.SMEM((2, BLOCK_M, _EPILOGUE_N), out_dtype, transforms=out_transforms)],
      interpret=interpret)(tile_expert, schedule.used_tiles_operand(used_tiles, num_tiles), a, a_scale,
                           _weight_operand(w), w_scale_rows, *([row_factor.reshape(1, num_rows)] if factored else []))


def _check_item_order(chain_items, used_tiles, group_m):
  if not isinstance(group_m, int) or group_m < 1:
    raise ValueError(f"group_m must be an int >= 1, got {group_m!r}")
  if chain_items and used_tiles is None:
    raise ValueError("chain_items needs used_tiles: chained items must all run, and only the used tiles "
                     "(the leading used_tiles of the schedule) are sure to have an expert")


def _item_expert(tile_expert_gmem, mi, num_local, chain_items):
  """The item's expert; chained (every item runs), clamped to a valid one, so that a used-tile count past
  the tiles of an expert (not what a schedule gives) reads a real expert's weights, not out of bounds."""
  expert = tile_expert_gmem[mi]
  return jnp.minimum(expert, num_local - 1) if chain_items else expert


def _persistent_call(kernel, *, name, out_type, scratch_types, interpret):
  """The kernel on the persistent grid (one CTA per SM, "sm"), two compute warpgroups and the TMA one ("wg")."""
  kernel.__name__ = name  # plgpu.kernel names the kernel after its body
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch_types, grid=(schedule.num_sms(interpret),),
                      grid_names=("sm",), num_threads=3, thread_name="wg", interpret=_interpret_params(interpret))


def _epilogue_on_up(acc, wg, rows, ni, out_gmem, out_scale_gmem, gate_smem, out_smem, scale_smem, exchange):
  """SwiGLU + quant of one work item on the up warpgroup: the gate warpgroup hands over silu(gate)."""
  @pl.when(wg == 1)
  def _():
    gate_smem[...] = silu(acc)

  plgpu.barrier_arrive(exchange)  # silu(gate) is in SMEM
  plgpu.barrier_wait(exchange)

  @pl.when(wg == 0)
  def _():
    swiglu = plgpu.load(gate_smem, layout=plgpu.Layout.WGMMA) * acc  # silu on the SECOND half
    values, scale = quantized_rows(swiglu, jnp.max(jnp.abs(swiglu), axis=1))
    out_smem[...] = values.astype(out_smem.dtype)
    scale_smem[...] = scale
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[rows, pl.ds(ni * SCALE_BLOCK, SCALE_BLOCK)])
    plgpu.copy_smem_to_gmem(scale_smem, out_scale_gmem.at[ni, rows])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  # The up warpgroup is done with gate_smem before the gate warpgroup writes the next item's: with few K
  # steps the gate warpgroup could run through a whole item while the up one is in this epilogue.
  plgpu.barrier_arrive(exchange)
  plgpu.barrier_wait(exchange)


def _epilogue_on_up_scratch():
  return [plgpu.SMEM((BLOCK_M, SCALE_BLOCK), jnp.float32),
          plgpu.SMEM((BLOCK_M, SCALE_BLOCK), jnp.float8_e4m3fn, transforms=_fp8_transforms()),
          plgpu.SMEM((BLOCK_M,), jnp.float32),
          plgpu.Barrier(num_arrivals=2)]


def _epilogue_split(acc, wg, rows, ni, out_gmem, out_scale_gmem, handoff, row_stats, out_smem, exchange):
  """SwiGLU + quant of one work item split by columns: warpgroup g forms columns g*64 .. g*64+63. The up
  warpgroup hands over up's second half, the gate warpgroup silu(gate)'s first half; the row amax is the
  max of the two halves' (exact), so the bits are `_epilogue_on_up`'s, with half the serial work each."""
  @pl.when(wg == 0)
  def _():
    handoff[1] = acc[:, _HALF:]

  @pl.when(wg == 1)
  def _():
    handoff[0] = silu(acc[:, :_HALF])

  plgpu.barrier_arrive(exchange)  # each warpgroup's half for the other is in SMEM
  plgpu.barrier_wait(exchange)
  # Each warpgroup forms its half of silu(gate) * up (silu on the SECOND half) in place of what it was
  # handed (a value cannot leave a pl.when branch, and Mosaic's warpgroup lowering has no select on a
  # scalar predicate); every element is written and read back by the same thread.
  handed = lambda i: plgpu.load(handoff.at[i], layout=plgpu.Layout.WGMMA)

  @pl.when(wg == 0)
  def _():
    handoff[0] = handed(0) * acc[:, :_HALF]

  @pl.when(wg == 1)
  def _():
    handoff[1] = silu(acc[:, _HALF:]) * handed(1)

  _quantize_halves(handed(wg), wg, rows, ni, out_gmem, out_scale_gmem, row_stats, out_smem, exchange)


def _quantize_halves(swiglu, wg, rows, ni, out_gmem, out_scale_gmem, row_stats, out_smem, exchange):
  """Warpgroup wg's 64 columns of silu(gate) * up, quantized with the row amax over both warpgroups' columns
  (the max of the two halves', exchanged through SMEM: exact) and stored with the rows' 1 x 128 scales."""
  row_stats[wg] = jnp.max(jnp.abs(swiglu), axis=1)
  plgpu.barrier_arrive(exchange)  # both halves' row amax are in SMEM
  plgpu.barrier_wait(exchange)
  row_max = lambda i: plgpu.load(row_stats.at[i], layout=plgpu.Layout.WGMMA.reduce(1))
  values, scale = quantized_rows(swiglu, jnp.maximum(row_max(0), row_max(1)))
  out_smem[wg] = values.astype(out_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows, pl.ds(ni * SCALE_BLOCK + wg * _HALF, _HALF)])

  @pl.when(wg == 0)
  def _():
    row_stats[2] = scale  # row 2 stages the scales (rows 0-1, the amax, are read by now)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(row_stats.at[2], out_scale_gmem.at[ni, rows])

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _epilogue_split_scratch():
  # Row stats: the two halves' row amax (rows 0, 1) and the scales out (row 2), one buffer: with a fifth
  # scratch buffer here the kernel hung in Mosaic GPU's interpret mode (jax 0.11.2).
  swizzle = plgpu.find_swizzle(_HALF * 8)  # 64 FP8 values a row: 64 bytes
  return [plgpu.SMEM((2, BLOCK_M, _HALF), jnp.float32),
          plgpu.SMEM((3, BLOCK_M), jnp.float32),
          plgpu.SMEM((2, BLOCK_M, _HALF), jnp.float8_e4m3fn,
                     transforms=(plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))),
          plgpu.Barrier(num_arrivals=2)]


def _epilogue_paired(accs, wg, rows, ni, out_gmem, out_scale_gmem, row_stats, out_smem, exchange):
  """SwiGLU + quant of one work item whose warpgroups hold up AND gate of the same 64 columns (`paired`):
  each forms silu(gate) * up of its columns in registers; only the row amax crosses warpgroups (the max of
  the two halves', exact), so the bits are `_epilogue_split`'s, with no values handed over."""
  up, gate = accs
  _quantize_halves(silu(gate) * up, wg, rows, ni, out_gmem, out_scale_gmem, row_stats, out_smem, exchange)
  # Both warpgroups have read the amax rows before either writes the next item's (with few K steps one
  # could otherwise run through a whole item meanwhile: no hand-over in between holds it back).
  plgpu.barrier_arrive(exchange)
  plgpu.barrier_wait(exchange)


def _epilogue_paired_scratch():
  return _epilogue_split_scratch()[1:]  # no hand-over buffer: row stats, FP8 staging, the barrier


# How `grouped_fp8_gemm_swiglu`'s two compute warpgroups share an item: its epilogue and that one's scratch.
_FUSED_EPILOGUES = {"on_up": (_epilogue_on_up, _epilogue_on_up_scratch),
                    "split": (_epilogue_split, _epilogue_split_scratch),
                    "paired": (_epilogue_paired, _epilogue_paired_scratch)}
FUSED_WARPGROUPS = tuple(_FUSED_EPILOGUES)


def grouped_fp8_gemm_swiglu(tile_expert, a, a_scale, w13, w13_scale, *, used_tiles=None, warpgroups: str = "on_up",
                            name: str = "moe_gemm1_swiglu_mosaic", interpret=False, w_scale_rows=None,
                            chain_items=False, group_m: int = DEFAULT_GROUP_M):
  """GEMM1 with SwiGLU and the FP8 quant in its epilogue (the H200 table's GEMM1 above 128 rows per expert).

  The CTA of M-tile i and column block j computes the up columns j*128.. (compute warpgroup 0) and the gate
  columns I + j*128.. (warpgroup 1) of `a @ w13[e].T` with the same promotion as `grouped_fp8_gemm`; the
  gate warpgroup passes silu(gate) to the up warpgroup through SMEM, which forms silu(gate) * up, its
  per-row amax over the 128 columns, and writes the FP8 values and their 1 x 128 scales, as
  `grouped_gemm.swiglu_of_partials` does from float32 partials (no [rows, 2I] float32 round trip).

  Args:
    tile_expert, a, a_scale, used_tiles, w_scale_rows, chain_items, group_m: as `grouped_fp8_gemm`.
    w13: [E_local, 2I, H] float8_e4m3fn (up rows first, then gate), or block-major as `grouped_fp8_gemm`'s w;
      w13_scale: [E_local, 2I/128, H/128].
    warpgroups: how the two compute warpgroups share an item (`FUSED_WARPGROUPS`):
      - "on_up": up and gate tiles as above, SwiGLU + quant on the up warpgroup (`_epilogue_on_up`).
      - "split": the same products, SwiGLU + quant split by columns over both warpgroups
        (`_epilogue_split`: the same bits, GEMM1 0-1.6 % faster on the H200).
      - "paired": warpgroup g takes columns g*64 .. g*64+63 of both up and gate (two 64-wide wgmmas a K
        step, `_epilogue_paired`): both run the same code, with no branch around the wgmma, which on the
        H200 kept ptxas from folding the accumulator's zeroing into the wgmma and made it inject
        warpgroup.arrive's (experiments/PERF.md 41); GEMM1 6-10 % faster at T >= 11948 (PERF 44), the
        H200 table's choice.

  Returns:
    (values [rows, I] float8_e4m3fn, scales [I/128, rows] float32). Rows of tiles of no expert unwritten.
  """
  num_rows, k = a.shape
  num_local, two_i, k_w = weight_layout.logical_shape(w13)
  block_major = weight_layout.is_block_major(w13)
  intermediate = two_i // 2
  num_tiles = tile_expert.shape[0]
  if k != k_w or num_rows != num_tiles * BLOCK_M or intermediate % SCALE_BLOCK or k % SCALE_BLOCK:
    raise ValueError(f"grouped_fp8_gemm_swiglu: a {a.shape} ({num_tiles} tiles of {BLOCK_M} rows) and w13 "
                     f"{w13.shape} need equal K, rows = tiles * {BLOCK_M} and I, K multiples of {SCALE_BLOCK}")
  if a_scale.shape != (k // SCALE_BLOCK, num_rows) or w13_scale.shape != (num_local, two_i // SCALE_BLOCK,
                                                                           k // SCALE_BLOCK):
    raise ValueError(f"scale shapes {a_scale.shape} and {w13_scale.shape} do not match a {a.shape} and w13 "
                     f"{w13.shape}")
  k_steps = k // SCALE_BLOCK
  i_blocks = intermediate // SCALE_BLOCK
  w_scale_rows = _scale_rows_operand(w13_scale, w_scale_rows)
  _check_item_order(chain_items, used_tiles, group_m)

  if warpgroups not in FUSED_WARPGROUPS:
    raise ValueError(f"warpgroups must be one of {FUSED_WARPGROUPS}, got {warpgroups!r}")
  paired = warpgroups == "paired"
  epilogue, scratch_of_epilogue = _FUSED_EPILOGUES[warpgroups]
  epilogue_scratch = scratch_of_epilogue()

  def kernel(tile_expert_gmem, used_tiles_gmem, a_gmem, a_scale_gmem, w_gmem, w_scale_gmem, out_gmem,
             out_scale_gmem, *scratch):
    wg = lax.axis_index("wg")  # 0: up columns, 1: gate columns
    operands = lambda mi, ni, expert: (
        a_gmem.at[pl.ds(mi * BLOCK_M, BLOCK_M)],
        *[_weight_view(w_gmem, expert, half * intermediate + ni * SCALE_BLOCK, SCALE_BLOCK, block_major)
          for half in (0, 1)],
        a_scale_gmem.at[:, pl.ds(mi * BLOCK_M, BLOCK_M)], w_scale_gmem.at[expert])

    @_over_used_items(used_tiles_gmem, num_tiles, i_blocks, operands(0, 0, 0), k_steps=k_steps,
                      weight_rows=[SCALE_BLOCK, SCALE_BLOCK], group_m=group_m, chain_items=chain_items,
                      block_major=block_major)
    def _(mi, ni, run_pipeline):
      expert = _item_expert(tile_expert_gmem, mi, num_local, chain_items)

      def compute_context(eval_pipeline):
        width = _HALF if paired else SCALE_BLOCK
        zero = plgpu.layout_cast(jnp.zeros((BLOCK_M, width), jnp.float32), plgpu.Layout.WGMMA)
        accs = eval_pipeline((zero, zero) if paired else zero)
        epilogue(accs, wg, pl.ds(mi * BLOCK_M, BLOCK_M), ni, out_gmem, out_scale_gmem, *scratch)

      def step(_, a_smem, up_smem, gate_w_smem, a_scale_smem, w_scale_smem, carry):
        if paired:
          return _paired_k_step(carry, wg, a_smem, up_smem, gate_w_smem, a_scale_smem,
                                (w_scale_smem[0, ni], w_scale_smem[0, i_blocks + ni]))

        def issue_wgmma(acc_ref):
          # Each warpgroup multiplies by its own half's tile (one TMA box of up and gate together would need
          # more than the 5 strided dimensions an async copy allows).
          for half, w_smem in enumerate((up_smem, gate_w_smem)):
            pl.when(wg == half)(lambda w_smem=w_smem: plgpu.wgmma(acc_ref, a_smem, w_smem.transpose((1, 0))))

        return _promoted_k_step(carry, a_scale_smem, w_scale_smem[0, wg * i_blocks + ni], issue_wgmma)

      run_pipeline(step, compute_context, expert < num_local, *operands(mi, ni, expert))

  out_type = (jax.ShapeDtypeStruct((num_rows, intermediate), jnp.float8_e4m3fn),
              jax.ShapeDtypeStruct((i_blocks, num_rows), jnp.float32))
  return _persistent_call(kernel, name=name, out_type=out_type, scratch_types=epilogue_scratch, interpret=interpret)(
      tile_expert, schedule.used_tiles_operand(used_tiles, num_tiles), a, a_scale, _weight_operand(w13), w_scale_rows)
