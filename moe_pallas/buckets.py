"""Bounded recompiles across varying T: pad the token axis to a few bucket sizes.

`moe_layer` compiles one program per token count T (T is a static shape under jit), so a server whose batch
size varies compiles once per new T. Padding T up to `bucket_tokens(T)` (powers of two, at least
`min_bucket`) bounds the programs to about log2(T_max / min_bucket) + 1, at the cost of computing at most
2x the rows (the padding rows pick no local expert, see below, so they add routing and combine work but no
GEMM work):

    padded = bucket_tokens(T)                      # 37 -> 64
    logits_p, hs_p, hs_scale_p = pad_tokens(logits, hs, hs_scale, padded, local_expert_offset=off,
                                            num_local_experts=32)
    out = moe_layer(logits_p, bias, hs_p, hs_scale_p, w1, w1s, w2, w2s, local_expert_offset=off, ...)[:T]
    # or in one call: moe_layer_bucketed(logits, bias, hs, hs_scale, w1, w1s, w2, w2s, local_expert_offset=off, ...)

Why the padding rows change no result (every output row depends only on its own token):
  * routing (SPEC.md steps 2-5) is per token: sigmoid, bias, group and expert top-k, weights of row t read
    routing_logits[t] and the shared bias only. The NaN poison (`routing.nan_poison`) of row t reads
    routing_logits[t] and the bias; the padding logits are +-inf, which are valid (not NaN).
  * the expert GEMMs are row-independent: row t of A @ W^T reads row t of A and W; the FP8 re-quantization of
    the SwiGLU output on the kernels uses 1 x 128 blocks of one row; the combine sums row t's own picks.
    Padding tokens sort after every real token of an expert (their ids are larger), so they never move a
    real token's pair.
  * so a real row is computed by the same operations on the same values whether padding rows exist or not.
    Within one padded size this is exact whatever the padding holds (tests/test_buckets.py checks it bit
    for bit on "xla" and on the kernels; where the count of used tiles picks one of two GEMM1 launches, both
    compute each product alike, which `MoETiling` checks). Between the padded and the unpadded size the
    kernels may pick other tiles for the other T (`kernels.tiling.default_tiling` keys on rows per expert),
    and a different GEMM1 block_n changes the FP8 re-quantization blocks of the SwiGLU output: then the rows
    agree within SPEC.md's bound rather than bit for bit (the tests check bit equality where the tiles
    agree).

Padding tokens pick no local expert: their logits are -inf on this rank's experts and +inf elsewhere, so
sigmoid scores are 0 on local experts and 1 elsewhere, and selection (score + bias) prefers the non-local
experts unless the bias favours local ones by more than 1 (DeepSeek-V3's score-correction biases are small),
or the rank holds too many experts (E - E_local < top_k, or fewer than top_k non-local experts in the kept
groups). Either way the padding rows are sliced off; only the GEMM work would grow.
"""

from __future__ import annotations

import jax.numpy as jnp

from moe_pallas import validation

__all__ = ["bucket_tokens", "moe_layer_bucketed", "pad_tokens"]


def bucket_tokens(num_tokens: int, *, min_bucket: int = 16) -> int:
  """The padded token count for `num_tokens`: 0 for 0, else the smallest power of two >= max(T, min_bucket).

  Distinct buckets for T in [1, T_max]: ceil(log2(T_max / min_bucket)) + 1 (17 programs up to T = 2^20 with
  the default min_bucket of 16). Power-of-two sizes also never equal H/128 = 56 at the DeepSeek-V3 shape,
  where the activation-scale layout cannot be told from the shapes (README).
  """
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
    raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
  if isinstance(min_bucket, bool) or not isinstance(min_bucket, int) or min_bucket < 1 or min_bucket & (min_bucket - 1):
    raise ValueError(f"min_bucket must be a power of two >= 1, got {min_bucket!r}")
  if num_tokens == 0:
    return 0
  return max(min_bucket, 1 << (num_tokens - 1).bit_length())


def pad_tokens(routing_logits, hidden_states, hidden_states_scale, num_padded_tokens: int, *, local_expert_offset,
               num_local_experts: int):
  """Pads the token axis of the three per-token inputs to `num_padded_tokens` rows (module docstring).

  Args:
    routing_logits: [T, E] float32; hidden_states: [T, H] float8_e4m3fn; hidden_states_scale: [H/128, T]
      float32 (the public transposed layout).
    num_padded_tokens: >= T, e.g. `bucket_tokens(T)`.
    local_expert_offset, num_local_experts: this rank's experts (the offset may be traced), which the
      padding tokens avoid.

  Returns:
    (routing_logits, hidden_states, hidden_states_scale) with num_padded_tokens tokens: the first T rows
    (columns of the scale) unchanged; padding logits -inf on the local experts and +inf elsewhere, padding
    activations and scales zero.
  """
  if routing_logits.ndim != 2 or hidden_states.ndim != 2 or hidden_states_scale.ndim != 2:
    raise ValueError("pad_tokens expects routing_logits [T, E], hidden_states [T, H], hidden_states_scale [H/128, T]")
  num_tokens, num_experts = routing_logits.shape
  if hidden_states.shape[0] != num_tokens or hidden_states_scale.shape[1] != num_tokens:
    raise ValueError(f"pad_tokens: routing_logits has {num_tokens} tokens, hidden_states {hidden_states.shape[0]}, "
                     f"hidden_states_scale [H/128, T] {hidden_states_scale.shape[1]}")
  if isinstance(num_padded_tokens, bool) or not isinstance(num_padded_tokens, int) or num_padded_tokens < num_tokens:
    raise ValueError(f"num_padded_tokens must be an int >= T = {num_tokens}, got {num_padded_tokens!r}")
  if isinstance(num_local_experts, bool) or not isinstance(num_local_experts, int) or num_local_experts < 1:
    raise ValueError(f"num_local_experts must be an int >= 1, got {num_local_experts!r}")
  extra = num_padded_tokens - num_tokens
  if extra == 0:
    return routing_logits, hidden_states, hidden_states_scale
  expert = jnp.arange(num_experts)
  offset = jnp.asarray(local_expert_offset, jnp.int32)
  local = (expert >= offset) & (expert < offset + num_local_experts)
  pad_row = jnp.where(local, -jnp.inf, jnp.inf).astype(routing_logits.dtype)
  logits = jnp.concatenate([routing_logits, jnp.broadcast_to(pad_row, (extra, num_experts))], axis=0)
  states = jnp.concatenate([hidden_states, jnp.zeros((extra, hidden_states.shape[1]), hidden_states.dtype)], axis=0)
  scale = jnp.concatenate(
      [hidden_states_scale, jnp.zeros((hidden_states_scale.shape[0], extra), hidden_states_scale.dtype)], axis=1)
  return logits, states, scale


def moe_layer_bucketed(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                       gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, local_expert_offset,
                       routed_scaling_factor, min_bucket: int = 16, config=None, implementation=None,
                       interpret: bool = False, intermediate_dtype=jnp.float8_e4m3fn):
  """`moe_layer` with T padded to `bucket_tokens(T, min_bucket=min_bucket)` and the output sliced back to
  [T, H]: one compiled program per bucket instead of one per T. Arguments as `moe_layer`'s; the gate runs at
  the real T first, so errors name the caller's shapes."""
  from moe_pallas.layer import moe_layer
  layer_kwargs = dict(routed_scaling_factor=routed_scaling_factor, config=config, implementation=implementation,
                      interpret=interpret, intermediate_dtype=intermediate_dtype)
  validation.check_layer(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                         gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
                         local_expert_offset=local_expert_offset, **layer_kwargs)
  num_tokens = routing_logits.shape[0]
  padded = bucket_tokens(num_tokens, min_bucket=min_bucket)
  logits, states, scale = pad_tokens(routing_logits, hidden_states, hidden_states_scale, padded,
                                     local_expert_offset=local_expert_offset,
                                     num_local_experts=gemm1_weights.shape[0])
  out = moe_layer(logits, routing_bias, states, scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                  gemm2_weights_scale, local_expert_offset=local_expert_offset, **layer_kwargs)
  return out[:num_tokens]
