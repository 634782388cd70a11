"""`moe_layer_sharded`: the gate (mesh, strategy, capacity, then `validation`), then one jitted program."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_pallas import validation
from moe_pallas.config import MoEConfig
from moe_pallas.quant import LocalExperts
from moe_pallas.sharding import program
from moe_pallas.sharding.dispatch import DEFAULT_CAPACITY_FACTOR, DispatchStats, bucket_capacity

STRATEGIES = ("all_gather", "all_to_all", "ragged_all_to_all")


def moe_layer_sharded(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                      gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, mesh: jax.sharding.Mesh,
                      routed_scaling_factor, config: MoEConfig | None = None, strategy: str = "all_to_all",
                      capacity: int | None = None, capacity_factor: float | None = None,
                      expert_axis: str = "expert", data_axis: str | None = None,
                      implementation: str | None = None, interpret: bool = False,
                      intermediate_dtype=jnp.float8_e4m3fn, return_stats: bool = False):
  """The DeepSeek-V3 FP8 block-scale MoE layer over all E experts, expert-parallel on `mesh`.

  Computes SPEC.md's function for every global expert (as if local_expert_offset = 0 and E_local = E): the
  float32 sum of the P single-rank partial outputs, rounded to bfloat16 once. Works inside `jax.jit`.

  Args:
    routing_logits: [T, E] float32.
    routing_bias: [E] bfloat16 or float32; used for expert selection only.
    hidden_states: [T, H] float8_e4m3fn.
    hidden_states_scale: [H/128, T] float32 (transposed, as in SPEC.md).
    gemm1_weights: [E, 2I, H] float8_e4m3fn, all global experts; split over `expert_axis` (place it with
      `NamedSharding(mesh, PartitionSpec(expert_axis))` to avoid a reshard per call).
    gemm1_weights_scale: [E, 2I/128, H/128] float32.
    gemm2_weights: [E, H, I] float8_e4m3fn; gemm2_weights_scale: [E, H/128, I/128] float32. Both weights
      in SPEC.md's [E, N, K] order: block-major ones (`moe_pallas.to_block_major`) are refused by name.
    mesh: a `jax.sharding.Mesh` (e.g. `jax.make_mesh((8,), ("expert",))`) with `expert_axis`, whose size P
      must divide E; shard p holds experts p*E/P .. (p+1)*E/P - 1.
    routed_scaling_factor: float multiplying the normalized routing weights (2.5 in DeepSeek-V3).
    config: routing constants (top_k, n_group, topk_group); DeepSeek-V3's by default when E = 256. Its sizes
      must match the shapes; its num_local_experts is ignored (the mesh sets E_local = E / P).
    strategy: "all_gather", "all_to_all" (default) or "ragged_all_to_all" (GPUs only); see the module doc.
    capacity: all_to_all only: tokens per (source, destination) bucket, overriding `capacity_factor`.
    capacity_factor: all_to_all only (default 1.25): C = min(T_local, ceil(factor * T_local * D / P)).
      Overflow never drops tokens: the call falls back to the all-gather strategy (exact) instead.
    expert_axis: the mesh axis the experts are split over.
    data_axis: optional second mesh axis; tokens are split over (data_axis, expert_axis) and each data index
      is an independent expert-parallel group (weights replicated over data_axis). None: tokens are split
      over expert_axis only. T need not divide: the tokens are padded and the padding routes nowhere.
    implementation: "xla", "triton" or None (best available), as in `moe_layer`.
    interpret: run the Pallas kernels in interpret mode (CPU).
    intermediate_dtype: float8_e4m3fn or bfloat16 SwiGLU output on the kernel path, as in `moe_layer`.
    return_stats: also return a `DispatchStats` (whether the all_to_all call fell back, bucket fill).

  Returns:
    [T, H] bfloat16, sharded over the token axes (replicated on Explicit-axis meshes when T is not a
    multiple of the token shard count); with `return_stats`, `(out, DispatchStats)`.

  Raises:
    ValueError / TypeError for bad shapes, dtypes, mesh axes, a P that does not divide E, or capacity
    arguments given to a strategy that has no buckets. NotImplementedError for "ragged_all_to_all" on a
    CPU mesh.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('expert',))), "
                    f"got {type(mesh).__name__}")
  if expert_axis not in mesh.axis_names:
    raise ValueError(f"expert_axis={expert_axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}")
  if data_axis is not None and (data_axis not in mesh.axis_names or data_axis == expert_axis):
    raise ValueError(f"data_axis={data_axis!r} must be None or a mesh axis other than expert_axis="
                     f"{expert_axis!r}; the mesh's axes are {mesh.axis_names}")
  axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
  if data_axis is not None and axis_types[data_axis] != axis_types[expert_axis]:
    raise ValueError(f"data_axis={data_axis!r} and expert_axis={expert_axis!r} must have the same AxisType, got "
                     f"{axis_types[data_axis]} and {axis_types[expert_axis]}")
  if strategy != "all_to_all" and (capacity is not None or capacity_factor is not None):
    raise ValueError(f"capacity and capacity_factor size the all_to_all buckets; strategy={strategy!r} has none "
                     f"(got capacity={capacity}, capacity_factor={capacity_factor})")
  if (strategy == "ragged_all_to_all" and mesh.devices.flat[0].platform == "cpu"
      and program.ragged_all_to_all is jax.lax.ragged_all_to_all):
    raise NotImplementedError(
        "strategy='ragged_all_to_all' needs GPUs: XLA:CPU does not implement the ragged-all-to-all collective. "
        "Use strategy='all_to_all' (the same dispatch with fixed per-destination buckets) or 'all_gather'.")

  checked = validation.check_all_experts(
      routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
      gemm2_weights, gemm2_weights_scale, routed_scaling_factor=routed_scaling_factor, config=config,
      implementation=implementation, interpret=interpret, intermediate_dtype=intermediate_dtype)
  config = checked.config
  num_experts, num_shards = config.num_experts, mesh.shape[expert_axis]
  if num_experts % num_shards:
    raise ValueError(f"the expert axis size {num_shards} (mesh axis {expert_axis!r}) must divide E={num_experts}")
  shard_config = config.with_local_experts(num_experts // num_shards)

  token_axes = (expert_axis,) if data_axis is None else (data_axis, expert_axis)
  num_tokens = routing_logits.shape[0]
  tokens_per_shard = -(-num_tokens // math.prod(mesh.shape[a] for a in token_axes))
  if capacity is not None:
    if not isinstance(capacity, int) or capacity <= 0:
      raise ValueError(f"capacity must be a positive int (tokens per bucket), got {capacity!r}")
    capacity = min(capacity, max(tokens_per_shard, 1))
  else:
    factor = DEFAULT_CAPACITY_FACTOR if capacity_factor is None else float(capacity_factor)
    if not factor > 0:
      raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    capacity = bucket_capacity(shard_config, num_shards=num_shards, tokens_per_shard=max(tokens_per_shard, 1),
                               capacity_factor=factor)

  if num_tokens == 0:
    out = jnp.zeros((0, config.hidden), jnp.bfloat16)
    stats = DispatchStats(jnp.zeros((), jnp.bool_), jnp.zeros((), jnp.int32), jnp.asarray(capacity, jnp.int32))
    return (out, stats) if return_stats else out

  st = program.ShardStatic(checked=checked._replace(config=shard_config, out_dtype=jnp.dtype(jnp.float32)),
                           num_shards=num_shards, strategy=strategy, capacity=capacity, expert_axis=expert_axis,
                           token_axes=token_axes)
  experts = LocalExperts.from_arrays(gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale)
  out, stats = program.sharded_program(routing_logits, routing_bias, hidden_states, hidden_states_scale, experts,
                                       routed_scaling_factor, mesh=mesh, st=st)
  return (out, stats) if return_stats else out
