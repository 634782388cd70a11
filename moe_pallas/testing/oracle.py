"""An independent float64 NumPy oracle of the layer in /work/shared/SPEC.md.

Written from the spec alone; it shares no code with `moe_pallas` (it imports NumPy only, so it also loads by
file path, as the peer harness loads it), and the two can only agree by both following the spec. Routing runs
in float32 exactly as the spec states, because routing is discrete: a token whose pick flips changes its whole
output row, and no tolerance absorbs that. Everything after routing runs in float64.

Memory: the full DeepSeek-V3 rank holds 32 experts of [4096, 7168] + [7168, 2048] FP8 weights, 11 GB once
dequantized to float64. The oracle therefore dequantizes only the experts that some token picked, one at a
time (about 350 MB each in float64).
"""

from __future__ import annotations

import numpy as np


def _as_f32(x) -> np.ndarray:
  return np.asarray(x).astype(np.float32)


def _as_f64(x) -> np.ndarray:
  return np.asarray(x).astype(np.float64)


def _sigmoid_f32(x: np.ndarray) -> np.ndarray:
  # exp(-x) overflows to inf for x < -88 in float32; 1 / (1 + inf) = 0 is the right limit, so the overflow
  # warning is expected and silenced.
  with np.errstate(over="ignore"):
    return np.float32(1) / (np.float32(1) + np.exp(-x))


def _silu_f64(x: np.ndarray) -> np.ndarray:
  # x * sigmoid(x): for x << 0 exp(-x) = inf and x / inf = -0, never inf * 0 = NaN.
  with np.errstate(over="ignore"):
    return x / (1.0 + np.exp(-x))


def oracle_route(routing_logits, routing_bias, *, top_k: int, n_group: int, topk_group: int,
                 routed_scaling_factor: float) -> tuple[np.ndarray, np.ndarray]:
  """DeepSeek-V3 grouped top-k routing (SPEC.md steps 2-5), selection in float32.

  Args:
    routing_logits: [T, E] float32 (NumPy or JAX array).
    routing_bias: [E] bfloat16 or float32; used as float32, for selection only.
    top_k, n_group, topk_group: routing constants (8, 8, 4 for DeepSeek-V3).
    routed_scaling_factor: multiplies the normalized weights (2.5 for DeepSeek-V3).

  Returns:
    topk_ids: [T, top_k] int64 global expert ids, in descending order of biased score (ties: lower id first).
    topk_weights: [T, top_k] float64, `s / (sum of s over the top_k picks + 1e-20) * routed_scaling_factor`
      with the unbiased float32 sigmoid `s`.

  Raises:
    ValueError: on inconsistent shapes or routing constants.
  """
  logits = _as_f32(routing_logits)
  bias = _as_f32(routing_bias)
  if logits.ndim != 2:
    raise ValueError(f"routing_logits must be [T, E], got shape {list(logits.shape)}")
  num_tokens, num_experts = logits.shape
  if bias.shape != (num_experts,):
    raise ValueError(f"routing_bias must be [E]=[{num_experts}], got shape {list(bias.shape)}")
  if num_experts % n_group:
    raise ValueError(f"E={num_experts} must be a multiple of {n_group=}")
  group_size = num_experts // n_group
  if group_size < 2:
    raise ValueError(f"the group score is a top-2 sum: need >= 2 experts per group, got {group_size}")
  if not 0 < topk_group <= n_group:
    raise ValueError(f"{topk_group=} must be in [1, {n_group=}]")
  if not 0 < top_k <= topk_group * group_size:
    raise ValueError(f"{top_k=} must be in [1, topk_group * group_size = {topk_group * group_size}]")

  s = _sigmoid_f32(logits)
  sb = s + bias[None, :]

  grouped = np.sort(sb.reshape(num_tokens, n_group, group_size), axis=-1)
  group_scores = grouped[..., -1] + grouped[..., -2]
  # A stable sort of the negated scores puts equal scores in index order: ties go to the lower index.
  kept_groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
  group_kept = np.zeros((num_tokens, n_group), dtype=bool)
  np.put_along_axis(group_kept, kept_groups, True, axis=-1)
  expert_kept = np.repeat(group_kept, group_size, axis=-1)

  masked = np.where(expert_kept, sb, np.finfo(np.float32).min)
  topk_ids = np.argsort(-masked, axis=-1, kind="stable")[:, :top_k]

  picked = np.take_along_axis(s, topk_ids, axis=-1).astype(np.float64)
  topk_weights = picked / (picked.sum(axis=-1, keepdims=True) + 1e-20) * float(routed_scaling_factor)
  return topk_ids.astype(np.int64), topk_weights


def _block_dequantize(values: np.ndarray, scales: np.ndarray, name: str) -> np.ndarray:
  """[M, K] FP8 values times one scale per (M/m_blocks x K/k_blocks) tile, in float64."""
  rows, cols = values.shape
  m_blocks, k_blocks = scales.shape
  if rows % m_blocks or cols % k_blocks:
    raise ValueError(f"{name}: a [{rows}, {cols}] matrix can't be tiled by a [{m_blocks}, {k_blocks}] scale grid")
  bm, bk = rows // m_blocks, cols // k_blocks
  tiles = _as_f64(values).reshape(m_blocks, bm, k_blocks, bk)
  return (tiles * _as_f64(scales)[:, None, :, None]).reshape(rows, cols)


def oracle_moe(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
               gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, local_expert_offset: int,
               routed_scaling_factor: float, top_k: int, n_group: int, topk_group: int) -> np.ndarray:
  """The whole layer (SPEC.md steps 1-7) in float64, without the final bfloat16 rounding.

  Args:
    routing_logits: [T, E] float32.
    routing_bias: [E] bfloat16 or float32.
    hidden_states: [T, H] float8_e4m3fn.
    hidden_states_scale: [H/B, T] float32, the public transposed layout: scale[b, t] multiplies
      hidden_states[t, b*B:(b+1)*B].
    gemm1_weights: [E_local, 2I, H] float8_e4m3fn (W13, [out, in]).
    gemm1_weights_scale: [E_local, 2I/B, H/B] float32.
    gemm2_weights: [E_local, H, I] float8_e4m3fn (W2, [out, in]).
    gemm2_weights_scale: [E_local, H/B, I/B] float32.
    local_expert_offset: global id of local expert 0.
    routed_scaling_factor, top_k, n_group, topk_group: routing constants.

  Returns:
    [T, H] float64. Tokens with no local pick get zero rows.

  Raises:
    ValueError: on inconsistent shapes.
  """
  hidden = np.asarray(hidden_states)
  hidden_scale = _as_f64(hidden_states_scale)
  w13, w13_scale = np.asarray(gemm1_weights), np.asarray(gemm1_weights_scale)
  w2, w2_scale = np.asarray(gemm2_weights), np.asarray(gemm2_weights_scale)
  if hidden.ndim != 2:
    raise ValueError(f"hidden_states must be [T, H], got shape {list(hidden.shape)}")
  num_tokens, h = hidden.shape
  if hidden_scale.ndim != 2 or hidden_scale.shape[1] != num_tokens or h % hidden_scale.shape[0]:
    raise ValueError(f"hidden_states_scale must be [H/B, T] with T={num_tokens}, H={h}, "
                     f"got shape {list(hidden_scale.shape)}")
  num_local = w13.shape[0]
  if w13.ndim != 3 or w13.shape[2] != h or w13.shape[1] % 2:
    raise ValueError(f"gemm1_weights must be [E_local, 2I, H={h}], got shape {list(w13.shape)}")
  two_i = w13.shape[1]
  inter = two_i // 2
  if w2.shape != (num_local, h, inter):
    raise ValueError(f"gemm2_weights must be [E_local, H, I]=[{num_local}, {h}, {inter}], got {list(w2.shape)}")
  if w13_scale.ndim != 3 or w13_scale.shape[0] != num_local:
    raise ValueError(f"gemm1_weights_scale must be [E_local, 2I/B, H/B], got shape {list(w13_scale.shape)}")
  if w2_scale.ndim != 3 or w2_scale.shape[0] != num_local:
    raise ValueError(f"gemm2_weights_scale must be [E_local, H/B, I/B], got shape {list(w2_scale.shape)}")
  if np.asarray(routing_logits).shape[:1] != (num_tokens,):
    raise ValueError(f"routing_logits must have T={num_tokens} rows, got shape "
                     f"{list(np.asarray(routing_logits).shape)}")

  topk_ids, topk_weights = oracle_route(routing_logits, routing_bias, top_k=top_k, n_group=n_group,
                                        topk_group=topk_group, routed_scaling_factor=routed_scaling_factor)

  block = h // hidden_scale.shape[0]
  activations = (_as_f64(hidden).reshape(num_tokens, h // block, block)
                 * hidden_scale.T[:, :, None]).reshape(num_tokens, h)

  out = np.zeros((num_tokens, h), dtype=np.float64)
  local_ids = topk_ids - int(local_expert_offset)
  for le in range(num_local):
    tokens, slots = np.nonzero(local_ids == le)
    if tokens.size == 0:
      continue
    w13_le = _block_dequantize(w13[le], w13_scale[le], "gemm1_weights")
    gate_up = activations[tokens] @ w13_le.T
    del w13_le
    # SPEC step 6: silu applies to the SECOND half; the first half is the linear factor.
    c = _silu_f64(gate_up[:, inter:]) * gate_up[:, :inter]
    o = c @ _block_dequantize(w2[le], w2_scale[le], "gemm2_weights").T
    # A token picks an expert at most once, so `tokens` has no repeats and fancy-index += is safe.
    out[tokens] += topk_weights[tokens, slots][:, None] * o
  return out
