"""The floor (roofline) of one layer call, SPEC.md's formula, the same everywhere in the project.

bytes = the FP8 weights + float32 block scales of every local expert that at least one token picked
        (W13 2I*H + W2 H*I bytes, scales (2I/B*H/B + H/B*I/B)*4; 44.05 MB per DeepSeek-V3 expert)
      + activations in: hidden_states fp8 [T, H], its scales float32 [H/B, T], routing_logits float32 [T, E],
        routing_bias [E] (bfloat16, as the public definition passes it)
      + output: bfloat16 [T, H].
flops = 2 * pairs * (H * 2I + I * H)  (88.08 MFLOP per local (token, expert) pair at DeepSeek-V3's shape).
floor = max(bytes / copy bandwidth, flops / FP8 matrix rate).
"""

from __future__ import annotations

import dataclasses

# cuBLAS FP8 8192^3 on our H100 (ANCHORS.md); XLA's own FP8 dot reaches only ~700.
DEFAULT_MATRIX_FLOPS = 1443e12


def expert_bytes(config) -> int:
  """FP8 weights + float32 scales of one expert (W13 and W2)."""
  h, i, b = config.hidden, config.intermediate, config.block
  weights = 2 * i * h + h * i
  scales = 4 * ((2 * i // b) * (h // b) + (h // b) * (i // b))
  return weights + scales


def activation_bytes(config, num_tokens: int, *, bias_itemsize: int = 2) -> int:
  """Activations in (fp8 hidden states, their scales, routing logits and bias) and out (bf16)."""
  h, b, e = config.hidden, config.block, config.num_experts
  inputs = num_tokens * h + 4 * (h // b) * num_tokens + 4 * num_tokens * e + bias_itemsize * e
  output = 2 * num_tokens * h
  return inputs + output


def flops_per_pair(config) -> int:
  return 2 * (config.hidden * 2 * config.intermediate + config.intermediate * config.hidden)


@dataclasses.dataclass(frozen=True)
class Floor:
  bytes: int
  flops: int
  memory_us: float
  compute_us: float

  @property
  def floor_us(self) -> float:
    return max(self.memory_us, self.compute_us)

  @property
  def bound(self) -> str:
    return "memory" if self.memory_us >= self.compute_us else "compute"

  @property
  def arithmetic_intensity(self) -> float:
    return self.flops / self.bytes


def floor(config, *, num_tokens: int, pairs: int, experts_touched: int, copy_bw_Bps: float,
          matrix_flops: float = DEFAULT_MATRIX_FLOPS) -> Floor:
  """The floor of one call with `pairs` local (token, expert) pairs over `experts_touched` local experts."""
  nbytes = experts_touched * expert_bytes(config) + activation_bytes(config, num_tokens)
  nflops = pairs * flops_per_pair(config)
  return Floor(bytes=nbytes, flops=nflops, memory_us=nbytes / copy_bw_Bps * 1e6,
               compute_us=nflops / matrix_flops * 1e6)
