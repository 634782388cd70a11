"""Reading one MoE layer of a DeepSeek-V3 Hugging Face checkpoint into the layer's layout (SPEC.md).

A DeepSeek-V3/R1 checkpoint (`deepseek-ai/DeepSeek-V3`) is a directory of safetensors shards, a
`model.safetensors.index.json` whose `weight_map` says which shard holds each tensor, and a `config.json`.
One MoE layer `L` (layers `first_k_dense_replace` .. `num_hidden_layers - 1`; the first three are dense) is:

  model.layers.{L}.mlp.gate.weight                               [E, H]     bfloat16   router
  model.layers.{L}.mlp.gate.e_score_correction_bias              [E]        float32    selection bias
  model.layers.{L}.mlp.experts.{e}.{gate,up}_proj.weight         [I, H]     float8_e4m3fn
  model.layers.{L}.mlp.experts.{e}.down_proj.weight              [H, I]     float8_e4m3fn
  model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight_scale_inv   [N/128, K/128] float32
  model.layers.{L}.mlp.shared_experts.{gate,up,down}_proj.weight (+ weight_scale_inv), I_s = n_shared * I

Weights are [out, in] (`nn.Linear` layout), as in SPEC.md. `weight_scale_inv` is, despite its name, the
dequantization multiplier (DeepSeek's `weight_dequant` computes `fp8 * scale_inv`), i.e. exactly our `scales`;
tile (i, j) covers rows i*128 .. and columns j*128 .. of the weight, which is our tile layout, so the scales
are copied without transposition.

**The up/gate order.** The checkpoint's `config.json` has `hidden_act: "silu"`, and Hugging Face's
`DeepseekV3MLP.forward` computes `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: silu goes on `gate_proj`.
SPEC.md step 6 applies silu to the SECOND half of GEMM1's output (`C = silu(X2) * X1`), so GEMM1's weight is
`concat([up_proj; gate_proj])` along the output axis: rows 0 .. I-1 are `up_proj`, rows I .. 2I-1 are
`gate_proj` (and likewise for the scales, at tile granularity, which needs I % 128 == 0).
`load_moe_layer` checks `hidden_act == "silu"` when the config says it.

Reads are lazy and per tensor: the shard headers are parsed once, and each expert's tensors are read straight
into their slice of the stacked output, so host memory holds only the selected local experts (about 1.4 GB
for DeepSeek-V3's 32 experts per rank), never a shard or the checkpoint. The safetensors format (an 8-byte
little-endian header length, a JSON header of `dtype`, `shape` and `data_offsets`, then the raw bytes) is
parsed here directly: the `safetensors` package (0.8) cannot return F8_E4M3 tensors through its NumPy
frontend (it looks up `numpy.float8_e4m3fn`, which does not exist), and `ml_dtypes` gives the dtype instead.
No third-party package beyond NumPy and `ml_dtypes` is needed to read; writing test checkpoints uses
`safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import NamedTuple

import ml_dtypes
import numpy as np

from moe_pallas import validation
from moe_pallas.config import SCALE_BLOCK, MoEConfig
from moe_pallas.quant import BlockScaledArray

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# A shard header lists a few thousand tensors (tens of kB); anything near this is not a safetensors file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names -> NumPy dtypes (little-endian, as the format stores them).
_DTYPES = {
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
_FLOAT_TYPES = ("BF16", "F16", "F32")


class CheckpointError(ValueError):
  """A checkpoint that is missing a tensor, has a wrong dtype or shape, a non-finite scale or bias, or is not
  valid safetensors."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: its shard file, safetensors dtype name, shape, and absolute byte range."""

  file: str
  dtype: str
  shape: tuple[int, ...]
  begin: int
  end: int


def _read_header(path: str) -> dict[str, TensorInfo]:
  """Parses one shard's header; checks every entry's byte range against its dtype, shape and the file size."""
  try:
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) != 8:
        raise CheckpointError(f"{path}: not a safetensors file ({file_size} bytes, shorter than the 8-byte header "
                              "length)")
      (header_len,) = struct.unpack("<Q", prefix)
      if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
        raise CheckpointError(f"{path}: not a safetensors file (header length {header_len} for a file of "
                              f"{file_size} bytes)")
      header = json.loads(f.read(header_len))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise CheckpointError(f"{path}: cannot read the safetensors header: {err}") from err
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
  data_start = 8 + header_len
  entries = {}
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as err:
      raise CheckpointError(f"{path}: malformed header entry for {key!r}: {entry!r}") from err
    if dtype in _DTYPES:
      expected = math.prod(shape) * _DTYPES[dtype].itemsize
      if end - begin != expected:
        raise CheckpointError(f"{path}: tensor {key!r} ({dtype} {list(shape)}) needs {expected} bytes, its "
                              f"data_offsets {[begin, end]} give {end - begin}")
    if not 0 <= begin <= end or data_start + end > file_size:
      raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {[begin, end]} outside the file "
                            f"({file_size - data_start} data bytes): truncated shard?")
    entries[key] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
  return entries


class SafetensorsCheckpoint:
  """Lazy access to the tensors of a sharded (or single-file) safetensors checkpoint directory.

  Opening reads only `model.safetensors.index.json`; a shard's header is parsed the first time one of its
  tensors is asked for, and tensor bytes are read only by `read` / `read_into`.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    index_path = os.path.join(self.path, INDEX_FILE)
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: cannot read the 'weight_map' of the index: {err!r}") from err
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard files")
      self._weight_map = dict(weight_map)
    elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
      self._weight_map = {key: SINGLE_FILE for key in _read_header(os.path.join(self.path, SINGLE_FILE))}
    else:
      raise CheckpointError(f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE}; expected a Hugging Face "
                            "safetensors checkpoint directory")
    self._headers: dict[str, dict[str, TensorInfo]] = {}

  def keys(self) -> list[str]:
    return list(self._weight_map)

  def __contains__(self, key: str) -> bool:
    return key in self._weight_map

  def _missing(self, key: str) -> CheckpointError:
    prefix = key.rsplit(".", 2)[0] + "."
    nearby = sorted(k for k in self._weight_map if k.startswith(prefix))[:8]
    hint = f"; keys under {prefix!r}: {nearby}" if nearby else ""
    return CheckpointError(f"checkpoint {self.path} has no tensor {key!r}{hint}")

  def info(self, key: str) -> TensorInfo:
    if key not in self._weight_map:
      raise self._missing(key)
    file = os.path.join(self.path, self._weight_map[key])
    if file not in self._headers:
      if not os.path.exists(file):
        raise CheckpointError(f"tensor {key!r} is mapped to shard {self._weight_map[key]!r}, which does not "
                              f"exist in {self.path}")
      self._headers[file] = _read_header(file)
    header = self._headers[file]
    if key not in header:
      raise CheckpointError(f"the index maps tensor {key!r} to shard {self._weight_map[key]!r}, but that "
                            "shard does not contain it")
    return header[key]

  def check(self, key: str, *, dtypes: tuple[str, ...], shape: tuple[int, ...] | None = None,
            meaning: str = "") -> TensorInfo:
    """The tensor's info after checking its dtype (one of `dtypes`) and shape; errors name the key."""
    info = self.info(key)
    if info.dtype not in dtypes:
      raise CheckpointError(f"tensor {key!r} must have dtype {' or '.join(dtypes)}, got {info.dtype}")
    if shape is not None and info.shape != tuple(shape):
      what = f" ({meaning})" if meaning else ""
      raise CheckpointError(f"tensor {key!r} must have shape {list(shape)}{what}, got {list(info.shape)}")
    return info

  def read_into(self, key: str, out: np.ndarray) -> None:
    """Reads tensor `key` into `out`, a C-contiguous array (or view) of the tensor's dtype and shape."""
    info = self.info(key)
    dtype = _DTYPES.get(info.dtype)
    if dtype is None:
      raise CheckpointError(f"tensor {key!r} has dtype {info.dtype}, which this reader does not support")
    if out.dtype != dtype or out.shape != info.shape or not out.flags.c_contiguous:
      raise ValueError(f"read_into({key!r}): out must be C-contiguous {dtype.name} {list(info.shape)}, got "
                       f"{out.dtype.name} {list(out.shape)} (contiguous={out.flags.c_contiguous})")
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    with open(info.file, "rb", buffering=0) as f:
      f.seek(info.begin)
      got = f.readinto(buffer)
    if got != info.end - info.begin:
      raise CheckpointError(f"tensor {key!r}: read {got} of {info.end - info.begin} bytes from {info.file}")

  def read(self, key: str) -> np.ndarray:
    info = self.info(key)
    if info.dtype not in _DTYPES:
      raise CheckpointError(f"tensor {key!r} has dtype {info.dtype}, which this reader does not support")
    out = np.empty(info.shape, _DTYPES[info.dtype])
    self.read_into(key, out)
    return out


@dataclasses.dataclass(frozen=True)
class DeepSeekV3Config:
  """The MoE part of a DeepSeek-V3 `config.json`.

  Attributes:
    moe: the layer geometry with num_local_experts = E (narrow it with `MoEConfig.with_local_experts`).
    routed_scaling_factor: 2.5 in DeepSeek-V3.
    n_shared_experts: shared experts folded into one MLP of width n_shared_experts * I (1 in DeepSeek-V3).
    first_k_dense_replace: layers below this are dense MLPs, not MoE (3 in DeepSeek-V3).
    num_hidden_layers: MoE layers are first_k_dense_replace .. num_hidden_layers - 1 (the multi-token
      prediction layer, index num_hidden_layers, also has one).
  """

  moe: MoEConfig
  routed_scaling_factor: float
  n_shared_experts: int
  first_k_dense_replace: int
  num_hidden_layers: int


def read_config(path: str | os.PathLike) -> DeepSeekV3Config:
  """Reads `config.json` and checks that it describes the function SPEC.md computes.

  Raises:
    CheckpointError: missing config or field, or a setting the layer does not implement (activation other
      than silu, scoring other than sigmoid, top-k method other than noaux_tc, unnormalized top-k weights,
      FP8 blocks other than 128x128).
  """
  config_path = os.path.join(os.fspath(path), CONFIG_FILE)
  try:
    with open(config_path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise CheckpointError(f"cannot read {config_path}: {err}") from err

  def field(name, default=None):
    if name not in raw:
      if default is None:
        raise CheckpointError(f"{config_path} has no field {name!r}")
      return default
    return raw[name]

  expected = dict(hidden_act="silu", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)
  for name, want in expected.items():
    if name in raw and raw[name] != want:
      raise CheckpointError(f"{config_path}: {name}={raw[name]!r}, but the layer implements DeepSeek-V3's "
                            f"{name}={want!r}")
  block_size = raw.get("quantization_config", {}).get("weight_block_size", [SCALE_BLOCK, SCALE_BLOCK])
  if list(block_size) != [SCALE_BLOCK, SCALE_BLOCK]:
    raise CheckpointError(f"{config_path}: quantization_config.weight_block_size={block_size}, expected "
                          f"[{SCALE_BLOCK}, {SCALE_BLOCK}]")
  num_experts = int(field("n_routed_experts"))
  try:
    moe = MoEConfig(hidden=int(field("hidden_size")), intermediate=int(field("moe_intermediate_size")),
                    num_experts=num_experts, num_local_experts=num_experts,
                    top_k=int(field("num_experts_per_tok")), n_group=int(field("n_group")),
                    topk_group=int(field("topk_group")))
  except ValueError as err:
    raise CheckpointError(f"{config_path}: {err}") from err
  return DeepSeekV3Config(moe=moe, routed_scaling_factor=float(field("routed_scaling_factor")),
                          n_shared_experts=int(raw.get("n_shared_experts") or 0),
                          first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
                          num_hidden_layers=int(raw.get("num_hidden_layers", 0)))


class SharedExpertWeights(NamedTuple):
  """DeepSeek-V3's shared expert in the routed experts' layout, without the expert axis.

  gemm1: [2 I_s, H] float8_e4m3fn, rows [up_proj; gate_proj], (128, 128) blocks.
  gemm2: [H, I_s] float8_e4m3fn (down_proj), (128, 128) blocks.
  """

  gemm1: BlockScaledArray
  gemm2: BlockScaledArray


class MoELayerWeights(NamedTuple):
  """One rank's view of one DeepSeek-V3 MoE layer, as host (NumPy) arrays in SPEC.md's layout.

  Attributes:
    config: geometry with num_local_experts set to the experts loaded.
    routed_scaling_factor: from config.json.
    local_expert_offset: global id of local expert 0.
    router_weight: [E, H] as stored (bfloat16 in DeepSeek-V3); apply it in float32.
    e_score_correction_bias: [E] float32, the router's selection bias.
    gemm1: [E_local, 2I, H] float8_e4m3fn, per expert rows [up_proj; gate_proj]; scales [E_local, 2I/128, H/128].
    gemm2: [E_local, H, I] float8_e4m3fn (down_proj); scales [E_local, H/128, I/128].
    shared: the shared expert, or None when the checkpoint has none or it was not asked for.
  """

  config: MoEConfig
  routed_scaling_factor: float
  local_expert_offset: int
  router_weight: np.ndarray
  e_score_correction_bias: np.ndarray
  gemm1: BlockScaledArray
  gemm2: BlockScaledArray
  shared: SharedExpertWeights | None


def _read_fp8_linear(ckpt: SafetensorsCheckpoint, prefix: str, out_values: np.ndarray,
                     out_scales: np.ndarray, meaning: str) -> None:
  """Reads `{prefix}.weight` (FP8 [N, K]) and `{prefix}.weight_scale_inv` ([N/128, K/128]) into the outputs."""
  rows, cols = out_values.shape
  ckpt.check(f"{prefix}.weight", dtypes=("F8_E4M3",), shape=(rows, cols), meaning=meaning)
  ckpt.check(f"{prefix}.weight_scale_inv", dtypes=("F32",), shape=(rows // SCALE_BLOCK, cols // SCALE_BLOCK),
             meaning=f"one float32 scale per 128x128 tile of the [{rows}, {cols}] weight")
  ckpt.read_into(f"{prefix}.weight", out_values)
  ckpt.read_into(f"{prefix}.weight_scale_inv", out_scales)
  _check_finite(f"{prefix}.weight_scale_inv", out_scales)


def _check_finite(key: str, values: np.ndarray) -> None:
  """A scale or bias must be finite: a NaN or inf would turn rows NaN, or reroute tokens, far from its cause."""
  finite = np.isfinite(values)
  if not finite.all():
    bad = np.argwhere(~finite)
    first = tuple(int(i) for i in bad[0])
    raise CheckpointError(f"tensor {key!r} holds {len(bad)} non-finite value(s) (first at index {list(first)}: "
                          f"{values[first]}); scales and the routing bias must be finite")


def _read_gated_mlp(ckpt: SafetensorsCheckpoint, prefix: str, w13: BlockScaledArray, w2: BlockScaledArray,
                    hidden: int, intermediate: int) -> None:
  """Fills w13 = [up; gate] ([2I, H]) and w2 = down ([H, I]) from `{prefix}.{up,gate,down}_proj`."""
  half, half_tiles = intermediate, intermediate // SCALE_BLOCK
  # SPEC.md: silu on the second half of GEMM1's output; Hugging Face: act_fn(gate_proj(x)) * up_proj(x).
  _read_fp8_linear(ckpt, f"{prefix}.up_proj", w13.values[:half], w13.scales[:half_tiles],
                   f"up_proj [I, H] = [{intermediate}, {hidden}]")
  _read_fp8_linear(ckpt, f"{prefix}.gate_proj", w13.values[half:], w13.scales[half_tiles:],
                   f"gate_proj [I, H] = [{intermediate}, {hidden}]")
  _read_fp8_linear(ckpt, f"{prefix}.down_proj", w2.values, w2.scales,
                   f"down_proj [H, I] = [{hidden}, {intermediate}]")


def _empty_block_scaled(shape: tuple[int, ...]) -> BlockScaledArray:
  *lead, rows, cols = shape
  return BlockScaledArray(np.empty(shape, _DTYPES["F8_E4M3"]),
                          np.empty((*lead, rows // SCALE_BLOCK, cols // SCALE_BLOCK), np.float32),
                          (SCALE_BLOCK, SCALE_BLOCK))


def load_moe_layer(path: str | os.PathLike, layer: int, *, local_expert_offset: int = 0,
                   num_local_experts: int | None = None, include_shared: bool = True) -> MoELayerWeights:
  """Reads MoE layer `layer` of a DeepSeek-V3 checkpoint: the router and experts offset .. offset + E_local - 1.

  Args:
    path: the checkpoint directory (config.json, model.safetensors.index.json and the shards).
    layer: the decoder layer index L (a MoE layer: L >= first_k_dense_replace).
    local_expert_offset: global id of the first expert to load (a rank's `rank * E_local`).
    num_local_experts: how many experts to load; all E when None.
    include_shared: also read the shared expert (when config.json's n_shared_experts > 0).

  Returns:
    MoELayerWeights of NumPy arrays (see its docstring for shapes); gemm1 rows are [up_proj; gate_proj].

  Raises:
    CheckpointError: a missing config field or tensor, a tensor of the wrong dtype or shape (the message
      names the key, the expected and the found value), a non-finite (NaN or +-inf) `weight_scale_inv` or
      `e_score_correction_bias` entry (the message names the key and the first bad index), a dense layer,
      or an invalid expert range.
  """
  ckpt = SafetensorsCheckpoint(path)
  full = read_config(path)
  num_experts, hidden, intermediate = full.moe.num_experts, full.moe.hidden, full.moe.intermediate
  num_local = num_experts if num_local_experts is None else int(num_local_experts)
  offset = int(local_expert_offset)
  validation.check_local_expert_range(offset, num_local_experts=num_local, num_experts=num_experts,
                                      owner="the checkpoint's", error=CheckpointError)
  config = full.moe.with_local_experts(num_local)

  mlp = f"model.layers.{layer}.mlp"
  if f"{mlp}.gate.weight" not in ckpt and f"{mlp}.gate_proj.weight" in ckpt:
    raise CheckpointError(f"layer {layer} is a dense MLP layer, not MoE (first_k_dense_replace="
                          f"{full.first_k_dense_replace}: MoE layers start at {full.first_k_dense_replace})")
  ckpt.check(f"{mlp}.gate.weight", dtypes=_FLOAT_TYPES, shape=(num_experts, hidden), meaning="router [E, H]")
  ckpt.check(f"{mlp}.gate.e_score_correction_bias", dtypes=_FLOAT_TYPES, shape=(num_experts,), meaning="[E]")
  router_weight = ckpt.read(f"{mlp}.gate.weight")
  e_score_correction_bias = ckpt.read(f"{mlp}.gate.e_score_correction_bias").astype(np.float32)
  _check_finite(f"{mlp}.gate.e_score_correction_bias", e_score_correction_bias)

  gemm1 = _empty_block_scaled((num_local, 2 * intermediate, hidden))
  gemm2 = _empty_block_scaled((num_local, hidden, intermediate))
  for local in range(num_local):
    expert_w13 = BlockScaledArray(gemm1.values[local], gemm1.scales[local], gemm1.block_shape)
    expert_w2 = BlockScaledArray(gemm2.values[local], gemm2.scales[local], gemm2.block_shape)
    _read_gated_mlp(ckpt, f"{mlp}.experts.{offset + local}", expert_w13, expert_w2, hidden, intermediate)

  shared = None
  if include_shared and full.n_shared_experts > 0:
    shared_intermediate = full.n_shared_experts * intermediate
    w13 = _empty_block_scaled((2 * shared_intermediate, hidden))
    w2 = _empty_block_scaled((hidden, shared_intermediate))
    _read_gated_mlp(ckpt, f"{mlp}.shared_experts", w13, w2, hidden, shared_intermediate)
    shared = SharedExpertWeights(w13, w2)
  return MoELayerWeights(config=config, routed_scaling_factor=full.routed_scaling_factor,
                         local_expert_offset=offset, router_weight=router_weight, e_score_correction_bias=e_score_correction_bias,
                         gemm1=gemm1, gemm2=gemm2, shared=shared)
