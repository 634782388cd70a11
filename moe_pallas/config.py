"""Layer geometry: the DeepSeek-V3 preset and small shapes for tests."""

from __future__ import annotations

import dataclasses

# The FP8 scale block of SPEC.md: 1x128 activation blocks, 128x128 weight tiles. The layer (validation,
# kernels, checkpoint loader) runs this block only.
SCALE_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Static geometry of one expert-parallel rank of a DeepSeek-style MoE layer.

  Attributes:
    hidden: H, the model width (a multiple of `block`).
    intermediate: I, each expert's intermediate width; GEMM1 produces 2I (a multiple of `block`).
    num_experts: E, global routed experts seen by the router.
    num_local_experts: E_local, experts held by this rank (global ids offset .. offset + E_local - 1).
    top_k: experts picked per token.
    n_group: router groups (E must divide evenly).
    topk_group: groups kept per token before the top_k pick.
    block: FP8 quantization block of arrays of this geometry. The layer's entries accept only SCALE_BLOCK
      (128, DeepSeek-V3's) and reject other values, naming the config; other blocks describe test data for
      the block-agnostic float64 oracle (`moe_pallas.testing`).
  """

  hidden: int
  intermediate: int
  num_experts: int
  num_local_experts: int
  top_k: int
  n_group: int
  topk_group: int
  block: int = SCALE_BLOCK

  def __post_init__(self):
    for name in ("hidden", "intermediate", "num_experts", "num_local_experts", "top_k", "n_group",
                 "topk_group", "block"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
    if self.hidden % self.block or self.intermediate % self.block:
      raise ValueError(f"MoEConfig hidden={self.hidden} and intermediate={self.intermediate} must be "
                       f"multiples of block={self.block}")
    if self.num_experts % self.n_group:
      raise ValueError(f"MoEConfig num_experts={self.num_experts} must be a multiple of n_group={self.n_group}")
    if self.num_local_experts > self.num_experts:
      raise ValueError(f"MoEConfig num_local_experts={self.num_local_experts} exceeds "
                       f"num_experts={self.num_experts}")
    if self.topk_group > self.n_group:
      raise ValueError(f"MoEConfig topk_group={self.topk_group} exceeds n_group={self.n_group}")
    group_size = self.num_experts // self.n_group
    if group_size < 2:
      raise ValueError(f"MoEConfig needs >= 2 experts per group (the group score is a top-2 sum), "
                       f"got num_experts/n_group={group_size}")
    if self.top_k > self.topk_group * group_size:
      raise ValueError(f"MoEConfig top_k={self.top_k} exceeds the experts in the kept groups "
                       f"({self.topk_group} x {group_size})")

  @property
  def experts_per_group(self) -> int:
    return self.num_experts // self.n_group

  @classmethod
  def deepseek_v3(cls) -> "MoEConfig":
    """The production shape: one rank of an 8-way expert-parallel DeepSeek-V3/R1 layer."""
    return cls(hidden=7168, intermediate=2048, num_experts=256, num_local_experts=32, top_k=8, n_group=8,
               topk_group=4)

  @classmethod
  def small(cls) -> "MoEConfig":
    """A shape for CPU tests: 32 experts in 4 groups (keep 2), 8 local, top-4."""
    return cls(hidden=256, intermediate=128, num_experts=32, num_local_experts=8, top_k=4, n_group=4,
               topk_group=2)

  def with_local_experts(self, num_local_experts: int) -> "MoEConfig":
    return dataclasses.replace(self, num_local_experts=num_local_experts)


DEEPSEEK_V3 = MoEConfig.deepseek_v3()
SMALL = MoEConfig.small()
