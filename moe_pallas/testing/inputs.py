"""Random layer inputs like the public benchmark's, for tests and benchmarks.

Everything is drawn with `jax.random` on the default device, so the full DeepSeek-V3 rank (1.4 GB of FP8
weights) is cheap on a GPU and takes ~15 s on an idle 2-core CPU. The same seed gives the same arrays on
every backend: FP8 values bit for bit (threefry bits through a table), float32 draws up to the last ulp.
`random_layer_inputs(config, T, seed=s)` is exactly `random_weights(config, seed=s)` plus
`random_activations(config, T, seed=s)`, so a benchmark can keep one weight set and redraw activations.

Routing scenarios (`scenario=`), all with bias ~ N(0, 0.1) and logits ~ N(0, 1) plus an offset per expert:
  "uniform":   no offset. About T * top_k * E_local / E local (token, expert) pairs on average over ranks
               (T for DeepSeek-V3; one rank sees 0.4T..1.7T, as the bias favors some groups).
  "skewed":    the min(2, E_local) local experts with the largest bias (so the bias can't undo it) get +4 on
               every token's logit. sigmoid(4 + N(0, 1)) ~ 0.98, plus the bias, sits above nearly every
               token's top_k threshold, so both hot experts serve nearly every token while the other picks follow
               uniform routing: the load-imbalance case of the grouped GEMM. Measured over 30 seeds, T = 1000:
               DeepSeek-V3 at offset 32 has ~2.7T local rows, 75 % of them (>= 65 %) on the two hot experts;
               SMALL at offset 0 has ~2.35T, 85 % (>= 76 %).
  "all_local": +1 on the local experts' logits, -10 on the others', so all top_k picks of every token are
               local (T * top_k pairs, the compute worst case). A non-local expert's s is ~5e-5, so only its
               bias (|b| < ~0.4) competes with the local top_k (s ~ sigmoid(1 + N(0, 1)) + b); +1 rather than
               a saturating +10 keeps s varying per token, or the bias alone would send every token to the
               same top_k experts. Guaranteed in practice when the local experts fill whole routing groups
               (offset a multiple of E / n_group, as in every DeepSeek-V3 workload). Each draw is checked: a
               config that can't be satisfied, or a failed draw, raises ValueError.
  "no_local":  the mirror image (-10 local, +1 elsewhere): no token picks a local expert (the empty call).
"""

from __future__ import annotations

import functools
import math
import statistics
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moe_pallas import validation
from moe_pallas.config import MoEConfig

SCENARIOS = ("uniform", "skewed", "all_local", "no_local")

# Independent streams for the two halves of an input set, so weights and activations of one seed are
# uncorrelated and either can be redrawn alone.
_WEIGHTS_STREAM = 0
_ACTIVATIONS_STREAM = 1

_SKEW_HOT_EXPERTS = 2
_SKEW_LOGIT_BOOST = 4.0
_FAVORED_LOGIT_SHIFT = 1.0
_UNFAVORED_LOGIT_SHIFT = -10.0
_BIAS_STD = 0.1


class LayerInputs(NamedTuple):
  """The layer's array inputs in SPEC.md order (the two scalars are passed separately)."""

  routing_logits: jax.Array       # [T, E] float32
  routing_bias: jax.Array         # [E] bfloat16 (or float32)
  hidden_states: jax.Array        # [T, H] float8_e4m3fn
  hidden_states_scale: jax.Array  # [H/B, T] float32, the public transposed layout
  gemm1_weights: jax.Array        # [E_local, 2I, H] float8_e4m3fn
  gemm1_weights_scale: jax.Array  # [E_local, 2I/B, H/B] float32
  gemm2_weights: jax.Array        # [E_local, H, I] float8_e4m3fn
  gemm2_weights_scale: jax.Array  # [E_local, H/B, I/B] float32


@functools.lru_cache(maxsize=None)
def _fp8_normal_table() -> np.ndarray:
  # e4m3(clip(Phi^-1(u), -2, 2)) at the 65536 midpoints u = (i + 0.5) / 2^16: inverse-CDF sampling of the
  # benchmark's clip(normal, -2, 2) -> e4m3 with a 16-bit uniform. The rarest e4m3 value in [-2, 2] (a
  # subnormal bin of probability ~8e-4) still spans ~50 entries, so the value frequencies are those of
  # rounding a float32 normal to within 2 %. One uint32 of random bits gives two samples through a 64 KB
  # lookup, 3x faster on a CPU than jax.random.normal followed by the cast.
  inv_cdf = statistics.NormalDist().inv_cdf
  quantiles = np.array([inv_cdf((i + 0.5) / 65536) for i in range(65536)], dtype=np.float64)
  return np.clip(quantiles, -2.0, 2.0).astype(ml_dtypes.float8_e4m3fn)


@functools.partial(jax.jit, static_argnames=("shape",))
def _fp8_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """clip(N(0, 1), -2, 2) rounded to float8_e4m3fn, [*shape]."""
  size = math.prod(shape)
  bits = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
  index = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:size].reshape(shape)
  return jnp.asarray(_fp8_normal_table()).at[index].get(mode="promise_in_bounds")


def seed_of(name: str) -> int:
  """A seed derived from a name (a test's node id, a workload): CRC32 as a non-negative int32.

  Stable across runs, processes and platforms (unlike `hash`), and accepted by every seeded API here
  (`jax.random.key`, `np.random.default_rng`, the `seed=` of this module).
  """
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _stream_key(seed: int, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), stream)


def _draw_per_expert(key: jax.Array, num_experts: int, shape: tuple[int, ...]) -> jax.Array:
  """[num_experts, *shape] FP8, expert e drawn from fold_in(key, e), assembled in one host array.

  Stacking the per-expert device arrays (`jnp.stack`) held the list and the stacked copy at once and peaked
  at 4x the weights on a CPU (5.7 GB for DeepSeek-V3's 1.4 GB, 21 s); here each expert is copied into its
  slot of one preallocated host array as soon as it is drawn, and the whole goes to the device once (the
  same values, bit for bit).
  """
  draws = (_fp8_normal(jax.random.fold_in(key, e), shape) for e in range(num_experts))
  first = next(draws)
  if isinstance(first, jax.core.Tracer):  # traced (jit, eval_shape): no host array, the same values
    return jnp.stack([first, *draws])
  host = np.empty((num_experts, *shape), ml_dtypes.float8_e4m3fn)
  host[0] = np.asarray(first)
  for e, draw in enumerate(draws, start=1):
    host[e] = np.asarray(draw)
  return jax.device_put(host)


def random_weights(config: MoEConfig, *, seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Random FP8 expert weights of one rank, like the public benchmark's.

  Values are clip(N(0, 1), -2, 2) cast to float8_e4m3fn; scales are N(0, 1) float32 (negative ones
  included). Experts are drawn one at a time (expert e from fold_in(key, e)) into one host array that
  goes to the device once (DeepSeek-V3's 1.4 GB: 2.2 GB peak resident memory and 13 s on a 2-core CPU).

  Args:
    config: the geometry (hidden H, intermediate I, num_local_experts E_local, block B).
    seed: any int (up to 2**32 - 1 and beyond).

  Returns:
    gemm1_weights [E_local, 2I, H] float8_e4m3fn, gemm1_weights_scale [E_local, 2I/B, H/B] float32,
    gemm2_weights [E_local, H, I] float8_e4m3fn, gemm2_weights_scale [E_local, H/B, I/B] float32.
  """
  h, i, b, e_local = config.hidden, config.intermediate, config.block, config.num_local_experts
  k13, k13_scale, k2, k2_scale = jax.random.split(_stream_key(seed, _WEIGHTS_STREAM), 4)
  gemm1_weights = _draw_per_expert(k13, e_local, (2 * i, h))
  gemm2_weights = _draw_per_expert(k2, e_local, (h, i))
  gemm1_weights_scale = jax.random.normal(k13_scale, (e_local, 2 * i // b, h // b), jnp.float32)
  gemm2_weights_scale = jax.random.normal(k2_scale, (e_local, h // b, i // b), jnp.float32)
  return gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale


def _favored_groups_can_hold_top_k(favored: np.ndarray, config: MoEConfig) -> bool:
  # Necessary for "all top_k picks in the favored set": some topk_group groups hold >= top_k favored experts.
  counts = np.sort(favored.reshape(config.n_group, config.experts_per_group).sum(axis=1))[::-1]
  return int(counts[:config.topk_group].sum()) >= config.top_k


def _picks(routing_logits: np.ndarray, routing_bias: np.ndarray, config: MoEConfig) -> np.ndarray:
  """[T, top_k] expert ids of SPEC.md's routing, in float32 (used only to check a scenario's draw)."""
  num_tokens = routing_logits.shape[0]
  with np.errstate(over="ignore"):
    s = np.float32(1) / (np.float32(1) + np.exp(-routing_logits.astype(np.float32)))
  sb = s + routing_bias.astype(np.float32)
  grouped = np.sort(sb.reshape(num_tokens, config.n_group, config.experts_per_group), axis=-1)
  group_scores = grouped[..., -1] + grouped[..., -2]
  kept = np.argsort(-group_scores, axis=-1, kind="stable")[:, :config.topk_group]
  group_kept = np.zeros((num_tokens, config.n_group), dtype=bool)
  np.put_along_axis(group_kept, kept, True, axis=-1)
  masked = np.where(np.repeat(group_kept, config.experts_per_group, axis=-1), sb, np.finfo(np.float32).min)
  return np.argsort(-masked, axis=-1, kind="stable")[:, :config.top_k]


def random_activations(config: MoEConfig, num_tokens: int, *, seed: int, scenario: str = "uniform",
                       local_expert_offset: int = 0, bias_dtype=jnp.bfloat16
                       ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Random router inputs and FP8 activations for `num_tokens` tokens.

  Args:
    config: the geometry.
    num_tokens: T >= 0.
    seed: any int; the same (seed, scenario, offset) gives the same arrays.
    scenario: "uniform", "skewed", "all_local" or "no_local" (see the module docstring).
    local_expert_offset: global id of local expert 0; it decides which experts the scenarios favor.
    bias_dtype: dtype of routing_bias; bfloat16 as in the public benchmark, float32 as in checkpoints.

  Returns:
    routing_logits [T, E] float32, routing_bias [E] bias_dtype (N(0, 0.1)), hidden_states [T, H]
    float8_e4m3fn (clip(N(0, 1), -2, 2)), hidden_states_scale [H/B, T] float32 (N(0, 1); transposed).

  Raises:
    ValueError: unknown scenario, bad num_tokens or offset, or a scenario this config/offset can't satisfy.
  """
  if scenario not in SCENARIOS:
    raise ValueError(f"scenario={scenario!r} must be one of {SCENARIOS}")
  if not isinstance(num_tokens, int) or num_tokens < 0:
    raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
  e, e_local = config.num_experts, config.num_local_experts
  validation.check_local_expert_range(local_expert_offset, num_local_experts=e_local, num_experts=e)
  is_local = np.zeros(e, dtype=bool)
  is_local[local_expert_offset:local_expert_offset + e_local] = True
  favored = {"all_local": is_local, "no_local": ~is_local}.get(scenario)
  if favored is not None and not _favored_groups_can_hold_top_k(favored, config):
    raise ValueError(
        f"scenario={scenario!r} is impossible for {config} at local_expert_offset={local_expert_offset}: "
        f"no {config.topk_group} routing groups (of {config.experts_per_group} experts) hold "
        f"top_k={config.top_k} of the {int(favored.sum())} experts it must pick from")

  k_logits, k_bias, k_hidden, k_scale = jax.random.split(_stream_key(seed, _ACTIVATIONS_STREAM), 4)
  routing_logits = jax.random.normal(k_logits, (num_tokens, e), jnp.float32)
  routing_bias = (_BIAS_STD * jax.random.normal(k_bias, (e,), jnp.float32)).astype(bias_dtype)
  if scenario == "skewed":
    local_bias = routing_bias[local_expert_offset:local_expert_offset + e_local].astype(jnp.float32)
    _, hot = jax.lax.top_k(local_bias, min(_SKEW_HOT_EXPERTS, e_local))
    routing_logits = routing_logits.at[:, local_expert_offset + hot].add(_SKEW_LOGIT_BOOST)
  elif favored is not None:
    shift = jnp.where(jnp.asarray(favored), _FAVORED_LOGIT_SHIFT, _UNFAVORED_LOGIT_SHIFT).astype(jnp.float32)
    routing_logits = routing_logits + shift
    picks_favored = favored[_picks(np.asarray(routing_logits), np.asarray(routing_bias), config)]
    if not picks_favored.all():
      bad = int((~picks_favored.all(axis=1)).sum())
      raise ValueError(
          f"scenario={scenario!r} draw failed for seed={seed}, local_expert_offset={local_expert_offset}: "
          f"{bad} of {num_tokens} tokens pick outside the intended experts. The local experts don't fill "
          f"whole routing groups of {config.experts_per_group}, so the bias can let another group win; use "
          f"an offset that is a multiple of {config.experts_per_group} or another seed")
  hidden_states = _fp8_normal(k_hidden, (num_tokens, config.hidden))
  hidden_states_scale = jax.random.normal(k_scale, (config.hidden // config.block, num_tokens), jnp.float32)
  return routing_logits, routing_bias, hidden_states, hidden_states_scale


def random_layer_inputs(config: MoEConfig, num_tokens: int, *, seed: int, scenario: str = "uniform",
                        local_expert_offset: int = 0, bias_dtype=jnp.bfloat16) -> LayerInputs:
  """`random_activations` and `random_weights` of one seed, as a `LayerInputs` in SPEC.md order."""
  activations = random_activations(config, num_tokens, seed=seed, scenario=scenario,
                                   local_expert_offset=local_expert_offset, bias_dtype=bias_dtype)
  return LayerInputs(*activations, *random_weights(config, seed=seed))
