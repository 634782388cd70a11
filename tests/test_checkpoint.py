"""The DeepSeek-V3 checkpoint loader on a small synthetic checkpoint in the real key format and dtypes."""

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest
import safetensors

from moe_pallas import SMALL, checkpoint
from moe_pallas.checkpoint import CheckpointError
from deepseek_checkpoint import (BF16, deepseek_config_json, moe_layer_tensors, unrelated_tensors, write_checkpoint,
                                 write_small_checkpoint)

LAYER = 3
SHARED_I = 128  # n_shared_experts = 1, so I_s = I
PREFIX = f"model.layers.{LAYER}.mlp"


def _bits(a):
  """Bit patterns, so FP8 NaN-free equality is exact and -0 vs +0 is caught."""
  a = np.asarray(a)
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return write_small_checkpoint(tmp_path_factory.mktemp("deepseek_v3"), SMALL, LAYER, seed=1,
                                shared_intermediate=SHARED_I)


def test_shards_are_real_safetensors_and_the_reader_agrees(ckpt):
  path, tensors = ckpt
  with open(os.path.join(path, checkpoint.INDEX_FILE)) as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) == 2  # the layer is spread over two shards
  written = {**unrelated_tensors(SMALL.hidden), **tensors}  # every array write_checkpoint wrote
  assert set(weight_map) == set(written)
  reader = checkpoint.SafetensorsCheckpoint(path)
  fp8_keys = 0
  for shard in set(weight_map.values()):
    with safetensors.safe_open(os.path.join(path, shard), framework="numpy") as f:
      for key in f.keys():
        got = reader.read(key)
        assert got.dtype == written[key].dtype and got.shape == written[key].shape, key
        np.testing.assert_array_equal(_bits(got), _bits(written[key]), err_msg=key)
        if f.get_slice(key).get_dtype() == "F8_E4M3":
          fp8_keys += 1
        else:  # and safetensors' own NumPy frontend agrees (it cannot read F8_E4M3: no numpy.float8_e4m3fn)
          np.testing.assert_array_equal(_bits(got), _bits(f.get_tensor(key)), err_msg=key)
  assert fp8_keys > 3 * SMALL.num_experts  # experts' weights and the unrelated FP8 tensors were all compared


def test_loads_layer_into_spec_layout(ckpt):
  path, tensors = ckpt
  offset, num_local, i = 8, 8, SMALL.intermediate
  w = checkpoint.load_moe_layer(path, LAYER, local_expert_offset=offset, num_local_experts=num_local)
  assert w.config == SMALL.with_local_experts(num_local) and w.local_expert_offset == offset
  assert w.routed_scaling_factor == 2.5
  assert w.gemm1.values.shape == (num_local, 2 * i, SMALL.hidden) and w.gemm1.values.dtype == ml_dtypes.float8_e4m3fn
  assert w.gemm1.scales.shape == (num_local, 2 * i // 128, SMALL.hidden // 128) and w.gemm1.block_shape == (128, 128)
  assert w.gemm2.values.shape == (num_local, SMALL.hidden, i) and w.gemm2.scales.shape == (num_local, 2, 1)
  for local in range(num_local):
    expert = f"{PREFIX}.experts.{offset + local}"
    # rows [up; gate]: SPEC.md's silu goes on the second half, HF's act_fn on gate_proj
    for rows, tiles, proj in ((slice(0, i), slice(0, i // 128), "up_proj"),
                              (slice(i, 2 * i), slice(i // 128, 2 * i // 128), "gate_proj")):
      np.testing.assert_array_equal(_bits(w.gemm1.values[local, rows]), _bits(tensors[f"{expert}.{proj}.weight"]))
      np.testing.assert_array_equal(w.gemm1.scales[local, tiles], tensors[f"{expert}.{proj}.weight_scale_inv"])
    np.testing.assert_array_equal(_bits(w.gemm2.values[local]), _bits(tensors[f"{expert}.down_proj.weight"]))
    np.testing.assert_array_equal(w.gemm2.scales[local], tensors[f"{expert}.down_proj.weight_scale_inv"])
  np.testing.assert_array_equal(_bits(w.router_weight), _bits(tensors[f"{PREFIX}.gate.weight"]))
  assert w.router_weight.dtype == BF16 and w.e_score_correction_bias.dtype == np.float32
  np.testing.assert_array_equal(w.e_score_correction_bias, tensors[f"{PREFIX}.gate.e_score_correction_bias"])
  shared = f"{PREFIX}.shared_experts"
  np.testing.assert_array_equal(_bits(w.shared.gemm1.values[:SHARED_I]), _bits(tensors[f"{shared}.up_proj.weight"]))
  np.testing.assert_array_equal(_bits(w.shared.gemm1.values[SHARED_I:]), _bits(tensors[f"{shared}.gate_proj.weight"]))
  np.testing.assert_array_equal(w.shared.gemm2.scales, tensors[f"{shared}.down_proj.weight_scale_inv"])
  assert checkpoint.load_moe_layer(path, LAYER, include_shared=False).shared is None


def _dequant(values, scales):
  rows, cols = values.shape
  tiles = np.asarray(values).astype(np.float64).reshape(rows // 128, 128, cols // 128, 128)
  return (tiles * np.asarray(scales, np.float64)[:, None, :, None]).reshape(rows, cols)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def test_up_gate_order_computes_the_hugging_face_mlp(tmp_path):
  # Distinct up and gate values (up ~ +3, gate ~ -3), so swapping the halves changes the result a lot.
  tensors = moe_layer_tensors(SMALL, LAYER, seed=2, up_offset=3.0, gate_offset=-3.0)
  write_checkpoint(tmp_path, tensors, deepseek_config_json(SMALL, n_shared_experts=0))
  w = checkpoint.load_moe_layer(tmp_path, LAYER, local_expert_offset=4, num_local_experts=2)
  x = np.random.default_rng(0).standard_normal((5, SMALL.hidden))
  i = SMALL.intermediate
  for local in range(2):
    expert = f"{PREFIX}.experts.{4 + local}"
    gate, up, down = (_dequant(tensors[f"{expert}.{p}.weight"], tensors[f"{expert}.{p}.weight_scale_inv"])
                      for p in ("gate_proj", "up_proj", "down_proj"))
    hugging_face = (_silu(x @ gate.T) * (x @ up.T)) @ down.T  # DeepseekV3MLP: down(act(gate(x)) * up(x))
    g = x @ _dequant(w.gemm1.values[local], w.gemm1.scales[local]).T
    spec = (_silu(g[:, i:]) * g[:, :i]) @ _dequant(w.gemm2.values[local], w.gemm2.scales[local]).T  # SPEC step 6
    np.testing.assert_allclose(spec, hugging_face, rtol=1e-12, atol=1e-12)
    swapped = (_silu(g[:, :i]) * g[:, i:]) @ _dequant(w.gemm2.values[local], w.gemm2.scales[local]).T
    assert np.linalg.norm(swapped - hugging_face) > 0.5 * np.linalg.norm(hugging_face)
  assert w.shared is None


def test_reads_only_the_requested_tensors(ckpt, monkeypatch):
  path, _ = ckpt
  read = []
  original = checkpoint.SafetensorsCheckpoint.read_into
  monkeypatch.setattr(checkpoint.SafetensorsCheckpoint, "read_into",
                      lambda self, key, out: (read.append(key), original(self, key, out))[1])
  checkpoint.load_moe_layer(path, LAYER, local_expert_offset=30, num_local_experts=2, include_shared=False)
  expected = {f"{PREFIX}.gate.weight", f"{PREFIX}.gate.e_score_correction_bias"}
  expected |= {f"{PREFIX}.experts.{e}.{p}.{t}" for e in (30, 31) for p in ("gate_proj", "up_proj", "down_proj")
               for t in ("weight", "weight_scale_inv")}
  assert sorted(read) == sorted(expected)


def _rewrite(path, tensors, **config_overrides):
  write_checkpoint(path, tensors, {**deepseek_config_json(SMALL), **config_overrides})
  return path


EXPERT = f"{PREFIX}.experts.5"


@pytest.mark.parametrize("corrupt,message", [
    (lambda t: t.pop(f"{EXPERT}.up_proj.weight"), f"no tensor '{EXPERT}.up_proj.weight'"),
    (lambda t: t.pop(f"{EXPERT}.down_proj.weight_scale_inv"), f"no tensor '{EXPERT}.down_proj.weight_scale_inv'"),
    (lambda t: t.pop(f"{PREFIX}.gate.e_score_correction_bias"), "e_score_correction_bias"),
    (lambda t: t.update({f"{EXPERT}.gate_proj.weight": t[f"{EXPERT}.gate_proj.weight"].astype(BF16)}),
     f"tensor '{EXPERT}.gate_proj.weight' must have dtype F8_E4M3, got BF16"),
    (lambda t: t.update({f"{EXPERT}.up_proj.weight_scale_inv": t[f"{EXPERT}.up_proj.weight_scale_inv"].astype(BF16)}),
     f"tensor '{EXPERT}.up_proj.weight_scale_inv' must have dtype F32, got BF16"),
    (lambda t: t.update({f"{EXPERT}.up_proj.weight_scale_inv": t[f"{EXPERT}.up_proj.weight_scale_inv"].T.copy()}),
     f"tensor '{EXPERT}.up_proj.weight_scale_inv' must have shape [1, 2]"),
    (lambda t: t.update({f"{EXPERT}.down_proj.weight": t[f"{EXPERT}.down_proj.weight"][:128].copy()}),
     f"tensor '{EXPERT}.down_proj.weight' must have shape [256, 128]"),
    (lambda t: t.update({f"{PREFIX}.gate.weight": t[f"{PREFIX}.gate.weight"][:16].copy()}),
     f"tensor '{PREFIX}.gate.weight' must have shape [32, 256]"),
])
def test_rejects_malformed_checkpoint(tmp_path, corrupt, message):
  tensors = moe_layer_tensors(SMALL, LAYER, seed=3)
  corrupt(tensors)
  _rewrite(tmp_path, tensors)
  with pytest.raises(CheckpointError, match=re.escape(message)):
    checkpoint.load_moe_layer(tmp_path, LAYER, local_expert_offset=4, num_local_experts=4)


def test_rejects_bad_layer_range_and_config(tmp_path):
  tensors = moe_layer_tensors(SMALL, LAYER, seed=4)
  _rewrite(tmp_path, tensors)
  with pytest.raises(CheckpointError, match="layer 0 is a dense MLP layer"):
    checkpoint.load_moe_layer(tmp_path, 0)
  with pytest.raises(CheckpointError, match=re.escape("no tensor 'model.layers.4.mlp.gate.weight'")):
    checkpoint.load_moe_layer(tmp_path, 4)
  with pytest.raises(CheckpointError, match="are not inside the checkpoint's 32 experts"):
    checkpoint.load_moe_layer(tmp_path, LAYER, local_expert_offset=28, num_local_experts=8)
  _rewrite(tmp_path, tensors, hidden_act="gelu")
  with pytest.raises(CheckpointError, match="hidden_act='gelu'"):
    checkpoint.load_moe_layer(tmp_path, LAYER)
  _rewrite(tmp_path, tensors, quantization_config={"weight_block_size": [1, 128]})
  with pytest.raises(CheckpointError, match="weight_block_size"):
    checkpoint.load_moe_layer(tmp_path, LAYER)
  with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
    checkpoint.load_moe_layer(tmp_path / "nowhere", LAYER)


def test_rejects_truncated_shard(tmp_path):
  tensors = moe_layer_tensors(SMALL, LAYER, seed=5)
  _rewrite(tmp_path, tensors)
  shard = tmp_path / "model-00002-of-00002.safetensors"
  shard.write_bytes(shard.read_bytes()[:-1000])
  with pytest.raises(CheckpointError, match="truncated shard"):
    checkpoint.load_moe_layer(tmp_path, LAYER)


SCALE = f"{EXPERT}.up_proj.weight_scale_inv"
BIAS = f"{PREFIX}.gate.e_score_correction_bias"


@pytest.mark.parametrize("key,index,value", [
    (BIAS, (7,), np.nan),
    (BIAS, (0,), np.inf),
    (BIAS, (31,), -np.inf),
    (SCALE, (0, 1), np.nan),
    (f"{EXPERT}.gate_proj.weight_scale_inv", (0, 0), np.inf),
    (f"{EXPERT}.down_proj.weight_scale_inv", (1, 0), -np.inf),
    (f"{PREFIX}.shared_experts.down_proj.weight_scale_inv", (0, 0), np.nan),
])
def test_rejects_non_finite_scales_and_bias(tmp_path, key, index, value):
  tensors = moe_layer_tensors(SMALL, LAYER, seed=6, shared_intermediate=SHARED_I)
  tensors[key] = tensors[key].copy()
  tensors[key][index] = value
  _rewrite(tmp_path, tensors)
  message = f"tensor {key!r} holds 1 non-finite value(s) (first at index {list(index)}: {np.float32(value)})"
  with pytest.raises(CheckpointError, match=re.escape(message)):
    checkpoint.load_moe_layer(tmp_path, LAYER, local_expert_offset=4, num_local_experts=4)


def test_non_finite_scale_of_an_expert_not_loaded_is_not_read(tmp_path):
  """Only the requested experts are read (and checked): a bad scale elsewhere does not stop a rank."""
  tensors = moe_layer_tensors(SMALL, LAYER, seed=7)
  tensors[SCALE] = np.full_like(tensors[SCALE], np.nan)  # expert 5
  _rewrite(tmp_path, tensors)
  w = checkpoint.load_moe_layer(tmp_path, LAYER, local_expert_offset=8, num_local_experts=8, include_shared=False)
  assert np.isfinite(w.gemm1.scales).all() and np.isfinite(w.gemm2.scales).all()
  with pytest.raises(CheckpointError, match=re.escape(f"tensor {SCALE!r} holds 2 non-finite value(s)")):
    checkpoint.load_moe_layer(tmp_path, LAYER, local_expert_offset=0, num_local_experts=8, include_shared=False)
