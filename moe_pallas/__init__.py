"""moe_pallas: the DeepSeek-V3 FP8 block-scale MoE layer for JAX, with Pallas kernels for NVIDIA GPUs."""

from moe_pallas.all_experts import moe_layer_all_experts
from moe_pallas.buckets import bucket_tokens, moe_layer_bucketed, pad_tokens
from moe_pallas.config import DEEPSEEK_V3, SMALL, MoEConfig
from moe_pallas.layer import IMPLEMENTATIONS, InferenceOnlyError, apply_local_experts, moe_layer
from moe_pallas.quant import BlockScaledArray, dequantize, quantize_blockwise
from moe_pallas.routing import RoutingPlan, plan_local, route
from moe_pallas.sharding import moe_layer_sharded
from moe_pallas.weight_layout import from_block_major, to_block_major

__version__ = "0.1.0"

__all__ = [
    "BlockScaledArray", "DEEPSEEK_V3", "IMPLEMENTATIONS", "InferenceOnlyError", "MoEConfig", "RoutingPlan", "SMALL",
    "apply_local_experts", "bucket_tokens", "dequantize", "from_block_major", "moe_layer", "moe_layer_all_experts",
    "moe_layer_bucketed", "moe_layer_sharded", "pad_tokens", "plan_local", "quantize_blockwise", "route",
    "to_block_major",
]
