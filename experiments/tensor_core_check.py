"""Runs the triton path once at a few T, for `ncu` to read which tensor-core pipe the GEMMs use.

  ncu --kernel-name regex:moe_gemm --launch-count 4 \
      --metrics sm__inst_executed_pipe_tensor_op_gmma.sum,sm__inst_executed_pipe_tensor_op_hmma.sum \
      python3 experiments/tensor_core_check.py

wgmma (Hopper's warpgroup MMA) counts under ..._gmma; mma.sync under ..._hmma.
"""
import jax
import moe_pallas as mp
from moe_pallas import testing

config = mp.DEEPSEEK_V3
for num_tokens in (64, 4096):
  inputs = testing.random_layer_inputs(config, num_tokens, seed=0, local_expert_offset=32)
  out = mp.moe_layer(*inputs, local_expert_offset=32, routed_scaling_factor=2.5, implementation="triton")
  print(num_tokens, out.shape, out.dtype, bool(jax.numpy.isfinite(out.astype(float)).all()))
