"""Writes a small synthetic checkpoint in DeepSeek-V3's exact Hugging Face format, for the loader's tests.

No real weights can be downloaded here, so the tests write what `deepseek-ai/DeepSeek-V3` ships, at a small
size: a `config.json` with DeepSeek-V3's field names, safetensors shards, and a
`model.safetensors.index.json` whose `weight_map` spreads one layer's tensors over two shards. Key names and
dtypes follow the real checkpoint: FP8 e4m3 expert weights [out, in] with float32 `weight_scale_inv`
[out/128, in/128], a bfloat16 router `gate.weight`, a float32 `gate.e_score_correction_bias`, an FP8 shared
expert, and a few unrelated tensors (embedding, attention, norms, a dense layer) the loader must skip.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import safetensors.numpy

from moe_pallas import MoEConfig

FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16


def deepseek_config_json(config: MoEConfig, *, routed_scaling_factor: float = 2.5, n_shared_experts: int = 1,
                         first_k_dense_replace: int = 3, num_hidden_layers: int = 5) -> dict:
  """DeepSeek-V3's config.json fields (values of the real one where they do not set a size)."""
  return {
      "architectures": ["DeepseekV3ForCausalLM"],
      "model_type": "deepseek_v3",
      "hidden_size": config.hidden,
      "intermediate_size": 4 * config.hidden,
      "moe_intermediate_size": config.intermediate,
      "n_routed_experts": config.num_experts,
      "n_shared_experts": n_shared_experts,
      "num_experts_per_tok": config.top_k,
      "n_group": config.n_group,
      "topk_group": config.topk_group,
      "routed_scaling_factor": routed_scaling_factor,
      "scoring_func": "sigmoid",
      "topk_method": "noaux_tc",
      "norm_topk_prob": True,
      "hidden_act": "silu",
      "first_k_dense_replace": first_k_dense_replace,
      "moe_layer_freq": 1,
      "num_hidden_layers": num_hidden_layers,
      "torch_dtype": "bfloat16",
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]},
  }


def _fp8_linear(rng: np.random.Generator, rows: int, cols: int, *, offset: float = 0.0):
  """An FP8 [rows, cols] weight like the benchmark's (clip(normal, -2, 2)) and its float32 scale_inv tiles.

  `offset` shifts the values so that two projections are told apart by their contents (the up/gate test).
  """
  values = (np.clip(rng.standard_normal((rows, cols)), -2, 2) + offset).astype(np.float32).astype(FP8)
  # Positive, small, spread over 2 decades like a real checkpoint's scale_inv, scaled so outputs stay O(1).
  scales = (np.exp(rng.uniform(np.log(0.1), np.log(10.0), (rows // 128, cols // 128))) / np.sqrt(cols))
  return values, scales.astype(np.float32)


def moe_layer_tensors(config: MoEConfig, layer: int, *, seed: int, shared_intermediate: int | None = None,
                      up_offset: float = 0.0, gate_offset: float = 0.0) -> dict[str, np.ndarray]:
  """All tensors of MoE layer `layer` under their DeepSeek-V3 names (all E global experts)."""
  rng = np.random.default_rng(seed)
  h, i, e = config.hidden, config.intermediate, config.num_experts
  prefix = f"model.layers.{layer}.mlp"
  tensors = {
      # Logits ~ N(0, 1) for bfloat16 activations ~ N(0, 1): the router is stored bfloat16, like DeepSeek-V3's.
      f"{prefix}.gate.weight": (rng.standard_normal((e, h)) / np.sqrt(h)).astype(BF16),
      f"{prefix}.gate.e_score_correction_bias": (0.1 * rng.standard_normal(e)).astype(np.float32),
  }

  def mlp(name, width):
    for proj, rows, cols, offset in (("gate_proj", width, h, gate_offset), ("up_proj", width, h, up_offset),
                                     ("down_proj", h, width, 0.0)):
      values, scales = _fp8_linear(rng, rows, cols, offset=offset)
      tensors[f"{name}.{proj}.weight"] = values
      tensors[f"{name}.{proj}.weight_scale_inv"] = scales

  for expert in range(e):
    mlp(f"{prefix}.experts.{expert}", i)
  if shared_intermediate:
    mlp(f"{prefix}.shared_experts", shared_intermediate)
  return tensors


def unrelated_tensors(hidden: int) -> dict[str, np.ndarray]:
  """The tensors `write_checkpoint` adds beside the layer's (embedding, norms, attention, a dense layer), which
  the loader must skip; the same arrays on every call, so a test can compare what was written."""
  rng = np.random.default_rng(0)
  h = hidden
  return {
      "model.embed_tokens.weight": rng.standard_normal((64, h)).astype(BF16),
      "model.norm.weight": np.ones(h, BF16),
      "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((128, h)).astype(FP8),
      "model.layers.0.mlp.gate_proj.weight_scale_inv": np.ones((1, h // 128), np.float32),
      "model.layers.3.input_layernorm.weight": np.ones(h, BF16),
      "model.layers.3.self_attn.q_a_proj.weight": rng.standard_normal((128, h)).astype(FP8),
      "model.layers.3.self_attn.q_a_proj.weight_scale_inv": np.ones((1, h // 128), np.float32),
  }


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, np.ndarray], config_json: dict) -> None:
  """Writes `tensors` as two safetensors shards plus the index and config.json, the way HF shards do.

  Shard 1 holds the router, the even experts and the unrelated tensors; shard 2 the odd experts and the
  shared expert, so a layer's tensors really are spread over files.
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  extras = unrelated_tensors(config_json["hidden_size"])
  shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
  names = list(shards)
  for key, value in {**extras, **tensors}.items():
    second = ".shared_experts." in key or (".experts." in key and int(key.split(".experts.")[1].split(".")[0]) % 2)
    shards[names[int(second)]][key] = np.ascontiguousarray(value)
  weight_map = {}
  for name, shard in shards.items():
    safetensors.numpy.save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({key: name for key in shard})
  total = sum(v.nbytes for v in {**extras, **tensors}.values())
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2)


def write_small_checkpoint(path: str | os.PathLike, config: MoEConfig, layer: int, *, seed: int,
                           shared_intermediate: int) -> tuple[str | os.PathLike, dict[str, np.ndarray]]:
  """One MoE layer (routed + shared experts) written at `path` with its config.json: (path, tensors)."""
  tensors = moe_layer_tensors(config, layer, seed=seed, shared_intermediate=shared_intermediate)
  write_checkpoint(path, tensors, deepseek_config_json(config))
  return path, tensors
