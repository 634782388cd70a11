"""The layer as a Flax NNX module, `DeepSeekMoE`, and as a Linen module through `to_linen`.

Needs the `flax` extra (`pip install moe_pallas[flax]`); `import moe_pallas` does not import Flax, only
`import moe_pallas.flax_module` does.

State, and what an optimizer sees (`nnx.Optimizer(model, tx, wrt=nnx.Param)` updates Params only):

  router_weight            nnx.Param     [E, H] float32       the router (DeepSeek-V3 `mlp.gate.weight`)
  e_score_correction_bias  RoutingBias   [E] float32          selection bias; DeepSeek-V3 moves it with a
                                                              load-balancing rule, not gradients
  gemm1                    ExpertWeights BlockScaledArray     [E_local, 2I, H] FP8, rows [up; gate]
  gemm2                    ExpertWeights BlockScaledArray     [E_local, H, I] FP8 (down)
                           (values block-major, [E_local, N/128, K/128, 128, 128], with weights_layout="block_major")
  shared_expert            SharedExpert  nnx.Params, bf16    optional: DeepSeek-V3's always-on expert

Constructor arguments follow Flax's conventions: `dtype` is the output dtype, `param_dtype` the storage dtype
of the trainable parameters (router and shared expert); the FP8 experts keep their own format. All arguments
are checked when the module is built, not at its first call.

Expert sharding: `gemm1` and `gemm2` carry `out_sharding=(expert_axis, None, None)` metadata, which fits
both the values and the scales of a BlockScaledArray (the expert axis leads both). Flax 0.12 shards a
variable eagerly at creation when it has `out_sharding`, and raises "An auto mesh context or metadata is
required" when there is no mesh. So each expert variable decides at creation (`expert_sharding_metadata`):

- with a mesh (`mesh=`, or `with jax.set_mesh(mesh):` around construction) it is created sharded over
  `expert_axis` (`eager_sharding=True`, the mesh in the variable's metadata), and when that axis has more
  than one device `__call__` runs expert-parallel through `moe_pallas.sharding.moe_layer_sharded` (the module
  must then hold the whole layer: num_local_experts == num_experts);
- without one it keeps the same `out_sharding` metadata but is created unsharded (`eager_sharding=False`):
  `nnx.get_partition_spec(nnx.state(model))` still gives `P(expert_axis, None, None)`, so
  `nnx.get_named_sharding(state, mesh)` places it later with `jax.device_put`, and `__call__` runs the
  single-rank `moe_layer`.

A mesh without `expert_axis` is an error (name one of its axes, or pass `expert_axis=None` to drop the
metadata). Inside a trace (Linen `apply` under `jit`) only the abstract mesh of `jax.set_mesh` is visible,
so pass `mesh=` explicitly there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import variablelib
from flax.nnx.bridge import variables as bridge_variables

from moe_pallas import IMPLEMENTATIONS, quant, reference, validation, weight_layout
from moe_pallas.config import MoEConfig
from moe_pallas.layer import moe_layer

EXPERT_AXIS = "expert"
DEEPSEEK_V3_ROUTED_SCALING_FACTOR = 2.5


@nnx.register_variable_name("fp8_experts", overwrite=True)
class ExpertWeights(nnx.Variable):
  """Routed experts' FP8 weights, a `BlockScaledArray`: not an `nnx.Param`, so optimizers skip it.

  Linen collection: "fp8_experts".
  """


@nnx.register_variable_name("routing_bias", overwrite=True)
class RoutingBias(nnx.Variable):
  """DeepSeek-V3's `e_score_correction_bias`, moved by load balancing, not by gradients. Collection "routing_bias"."""


def _context_mesh():
  """The mesh of `jax.set_mesh`: concrete outside a trace, abstract inside one; None when none is set."""
  if jax.sharding.get_abstract_mesh().empty:
    return None
  try:
    return jax.sharding.get_mesh()
  except ValueError:  # inside jit / eval_shape only the abstract mesh is available
    return jax.sharding.get_abstract_mesh()


def expert_sharding_metadata(expert_axis: str | None, mesh=None, ndim: int = 3) -> dict:
  """Variable metadata that shards the leading (expert) axis over `expert_axis`, with or without a mesh.

  Args:
    expert_axis: the mesh axis name, or None for no sharding metadata at all.
    mesh: a `jax.sharding.Mesh` to shard over; None uses the mesh of `jax.set_mesh`, if any.
    ndim: the variable's rank.

  Returns:
    {} for `expert_axis=None`; else `out_sharding=(expert_axis, None, ...)` and `eager_sharding`, True exactly
    when there is a mesh (Flax 0.12 cannot shard eagerly without one), plus `mesh` when one was passed.

  Raises:
    ValueError: the mesh has no axis named `expert_axis`.
  """
  if expert_axis is None:
    return {}
  metadata = dict(out_sharding=(expert_axis,) + (None,) * (ndim - 1))
  visible = mesh if mesh is not None else _context_mesh()
  if visible is not None and expert_axis not in visible.axis_names:
    raise ValueError(f"expert_axis={expert_axis!r} is not an axis of the mesh (axes {tuple(visible.axis_names)}); "
                     "name one of them, or pass expert_axis=None for no expert sharding")
  metadata["eager_sharding"] = visible is not None
  if mesh is not None:
    metadata["mesh"] = mesh
  return metadata


def _expert_parallel_mesh(config: MoEConfig, expert_axis, mesh):
  """The mesh to run expert-parallel on (an `expert_axis` of size > 1), or None for the single-rank layer."""
  visible = mesh if mesh is not None else _context_mesh()
  if expert_axis is None or visible is None or dict(zip(visible.axis_names, visible.axis_sizes))[expert_axis] == 1:
    return None
  size = dict(zip(visible.axis_names, visible.axis_sizes))[expert_axis]
  if config.num_local_experts != config.num_experts:
    raise ValueError(f"the mesh splits the experts over {size} devices on axis {expert_axis!r}, which needs the "
                     f"whole layer in the module (num_local_experts == num_experts = {config.num_experts}), got "
                     f"num_local_experts={config.num_local_experts}; build it outside the mesh (or with "
                     "expert_axis=None) to hold one rank's experts")
  if config.num_experts % size:
    raise ValueError(f"mesh axis {expert_axis!r} of size {size} must divide num_experts={config.num_experts}")
  if not isinstance(visible, jax.sharding.Mesh):
    raise ValueError("DeepSeekMoE is being built inside a trace (jit, eval_shape, a Linen apply) under an "
                     f"abstract mesh with {size} devices on {expert_axis!r}: pass the concrete mesh as mesh=")
  return visible


# jit: one compile per shape (seconds on a CPU), shared by every module built with it.
@functools.partial(jax.jit, static_argnames=("shape", "block"))
def _random_experts(key: jax.Array, shape: tuple[int, int, int], block: int) -> quant.BlockScaledArray:
  """N(0, 1/fan_in) experts quantized with (block, block) tiles, one expert at a time (small float32 peak)."""
  num, rows, cols = shape
  std = 1.0 / math.sqrt(cols)

  def one_expert(k):
    return quant.quantize_blockwise(jax.random.normal(k, (rows, cols), jnp.float32) * std, (block, block))

  return jax.lax.map(one_expert, jax.random.split(key, num))


WEIGHTS_LAYOUTS = ("spec", "block_major")


def _in_layout(experts: quant.BlockScaledArray, weights_layout: str) -> quant.BlockScaledArray:
  """[E_local, N, K] expert values as the module stores them (`weights_layout`); the scales as they are."""
  if weights_layout == "spec":
    return experts
  return dataclasses.replace(experts, values=weight_layout.to_block_major(experts.values))


def _check_layout_for_mesh(weights_layout: str, mesh) -> None:
  if weights_layout != "spec" and mesh is not None:
    raise ValueError(f"weights_layout={weights_layout!r} runs on one rank: the expert-parallel layer (a mesh "
                     "with several devices on expert_axis) takes [E, N, K] weights; use weights_layout='spec' there")


def _swiglu_mlp(x, gate_up, down, *, dtype):
  """down(silu(gate(x)) * up(x)) with gate_up = [up; gate] ([2I, H], [out, in]); float32 accumulation.

  The SwiGLU is the routed experts' (`reference.swiglu`): the same [up; gate] row order."""
  h = jnp.dot(x.astype(gate_up.dtype), gate_up.T, preferred_element_type=jnp.float32)
  c = reference.swiglu(h).astype(down.dtype)
  return jnp.dot(c, down.T, preferred_element_type=jnp.float32).astype(dtype)


def _first_dtype(*candidates) -> jnp.dtype:
  """The first dtype that is not None (np.dtype objects are falsy, so `or` cannot pick them)."""
  return jnp.dtype(next(d for d in candidates if d is not None))


def _check_arguments(*, config, local_expert_offset, routed_scaling_factor, shared_intermediate, implementation,
                     ep_strategy):
  """DeepSeekMoE's constructor arguments, checked when the module is built (a bad value must not wait for
  the first call, nor be silently truncated: an offset of 8.7 is an error, not expert 8)."""
  if not isinstance(config, MoEConfig):
    raise TypeError(f"config must be a moe_pallas.MoEConfig, got {type(config).__name__}")
  if isinstance(local_expert_offset, bool) or not isinstance(local_expert_offset, numbers.Integral):
    raise TypeError(f"local_expert_offset must be an int, got {type(local_expert_offset).__name__} "
                    f"{local_expert_offset!r}")
  validation.check_local_expert_range(local_expert_offset, num_local_experts=config.num_local_experts,
                                      num_experts=config.num_experts, owner="the config's")
  if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, numbers.Real):
    raise TypeError(f"routed_scaling_factor must be a real number, got {type(routed_scaling_factor).__name__} "
                    f"{routed_scaling_factor!r}")
  if not math.isfinite(float(routed_scaling_factor)):
    raise ValueError(f"routed_scaling_factor must be finite, got {routed_scaling_factor}")
  if isinstance(shared_intermediate, bool) or not isinstance(shared_intermediate, numbers.Integral):
    raise TypeError(f"shared_intermediate must be an int, got {type(shared_intermediate).__name__} "
                    f"{shared_intermediate!r}")
  if shared_intermediate < 0:
    raise ValueError(f"shared_intermediate must be >= 0 (0: no shared expert), got {shared_intermediate}")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None (the best available), "
                     f"got {implementation!r}")
  from moe_pallas import sharding  # pylint: disable=import-outside-toplevel
  if ep_strategy not in sharding.STRATEGIES:
    raise ValueError(f"ep_strategy must be one of {sharding.STRATEGIES}, got {ep_strategy!r}")


class SharedExpert(nnx.Module):
  """DeepSeek-V3's shared expert: a dense SwiGLU MLP every token goes through, in `param_dtype` (bfloat16).

  gate_up: nnx.Param [2 I_s, H], rows [up; gate] like the routed experts' GEMM1; down: nnx.Param [H, I_s].
  """

  def __init__(self, *, hidden: int, intermediate: int, rngs: nnx.Rngs, param_dtype=jnp.bfloat16):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
    self.gate_up = nnx.Param(init(rngs.params(), (2 * intermediate, hidden), jnp.float32).astype(param_dtype))
    self.down = nnx.Param(init(rngs.params(), (hidden, intermediate), jnp.float32).astype(param_dtype))

  def __call__(self, x: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    return _swiglu_mlp(x, self.gate_up[...], self.down[...], dtype=dtype)


class DeepSeekMoE(nnx.Module):
  """DeepSeek-V3 MoE block: router, FP8 routed experts (this rank's E_local), optional shared expert.

  `__call__` quantizes the activations to FP8 with 1x128 blocks, computes the router logits in float32 and
  runs `moe_pallas.moe_layer` (SPEC.md), or `moe_pallas.sharding.moe_layer_sharded` when built on a mesh
  whose `expert_axis` has several devices; the shared expert's output, if any, is added.

  Args (keyword-only):
    config: the geometry; holds experts `local_expert_offset .. + config.num_local_experts - 1` of
      `config.num_experts` (the whole layer when they are equal).
    rngs: initializes the router, the experts and the shared expert.
    local_expert_offset: global id of local expert 0, in [0, E - E_local].
    routed_scaling_factor: multiplies the normalized routing weights (2.5 in DeepSeek-V3).
    shared_intermediate: the shared expert's width I_s (n_shared_experts * I = 2048 in DeepSeek-V3); 0 for none.
    implementation, interpret, intermediate_dtype: passed to `moe_layer` ("xla", "triton" or None for the
      best available; interpret runs the Pallas kernels on CPU).
    dtype: the output dtype (bfloat16).
    param_dtype: the storage dtype of the router weight and the shared expert's parameters; None keeps
      float32 for the router and bfloat16 for the shared expert (DeepSeek-V3's checkpoint dtypes). Router
      logits are computed in float32 either way.
    router_dtype, shared_dtype: the router's and the shared expert's parameter dtype alone (the names before
      `param_dtype`; each, when given, wins over `param_dtype` for its part).
    expert_axis: mesh axis name for the experts' sharding metadata, or None (see the module docstring).
    mesh: a `jax.sharding.Mesh` to shard the experts over; None uses the mesh of `jax.set_mesh`, if any.
      With more than one device on `expert_axis`, the module must hold all experts and runs expert-parallel.
    data_axis, ep_strategy: `moe_layer_sharded`'s `data_axis` and `strategy`, for the expert-parallel call.
    weights_layout: "spec" ([E_local, N, K] expert values) or "block_major" (`moe_pallas.to_block_major`:
      [E_local, N/128, K/128, 128, 128], the same values, read faster by the kernels: PERF.md 64; the
      scales keep their shape). Not with an expert-parallel mesh (the sharded layer takes the SPEC order).

  Raises:
    ValueError / TypeError: a bad config, offset (not an int, or out of range), scaling factor, shared
      width, implementation, ep_strategy or weights_layout; a mesh without
      `expert_axis`; an expert-parallel mesh with a partial layer, an axis size that does not divide E, or
      block-major weights.
  """

  def __init__(self, *, config: MoEConfig, rngs: nnx.Rngs, local_expert_offset: int = 0,
               routed_scaling_factor: float = DEEPSEEK_V3_ROUTED_SCALING_FACTOR, shared_intermediate: int = 0,
               implementation: str | None = None, interpret: bool = False,
               intermediate_dtype=jnp.float8_e4m3fn, dtype=jnp.bfloat16, param_dtype=None, router_dtype=None,
               shared_dtype=None, expert_axis: str | None = EXPERT_AXIS, mesh: jax.sharding.Mesh | None = None,
               data_axis: str | None = None, ep_strategy: str = "all_to_all", weights_layout: str = "spec"):
    if weights_layout not in WEIGHTS_LAYOUTS:
      raise ValueError(f"weights_layout must be one of {WEIGHTS_LAYOUTS}, got {weights_layout!r}")
    _check_arguments(config=config, local_expert_offset=local_expert_offset,
                     routed_scaling_factor=routed_scaling_factor, shared_intermediate=shared_intermediate,
                     implementation=implementation, ep_strategy=ep_strategy)
    router_dtype = _first_dtype(router_dtype, param_dtype, jnp.float32)
    shared_dtype = _first_dtype(shared_dtype, param_dtype, jnp.bfloat16)
    self.config = config
    self.local_expert_offset = int(local_expert_offset)
    self.routed_scaling_factor = float(routed_scaling_factor)
    self.implementation = implementation
    self.interpret = bool(interpret)
    self.intermediate_dtype = jnp.dtype(intermediate_dtype)
    self.dtype = jnp.dtype(dtype)
    self.param_dtype = None if param_dtype is None else jnp.dtype(param_dtype)
    self.expert_axis = expert_axis
    self.data_axis = data_axis
    self.ep_strategy = ep_strategy
    self.weights_layout = weights_layout
    sharding = expert_sharding_metadata(expert_axis, mesh)
    self.mesh = _expert_parallel_mesh(config, expert_axis, mesh)
    _check_layout_for_mesh(weights_layout, self.mesh)

    e, e_local, h, i, b = (config.num_experts, config.num_local_experts, config.hidden, config.intermediate,
                           config.block)
    # Uniform(+-1/sqrt(H)) as torch's nn.Linear (DeepSeek-V3's router); the bias starts at 0 as in DeepSeek-V3.
    bound = 1.0 / math.sqrt(h)
    self.router_weight = nnx.Param(
        jax.random.uniform(rngs.params(), (e, h), jnp.float32, -bound, bound).astype(router_dtype))
    self.e_score_correction_bias = RoutingBias(jnp.zeros((e,), jnp.float32))
    experts = lambda shape: _in_layout(_random_experts(rngs.params(), shape, b), weights_layout)
    self.gemm1 = ExpertWeights(experts((e_local, 2 * i, h)), **sharding)
    self.gemm2 = ExpertWeights(experts((e_local, h, i)), **sharding)
    self.shared_expert = (SharedExpert(hidden=h, intermediate=int(shared_intermediate), rngs=rngs,
                                       param_dtype=shared_dtype) if shared_intermediate else None)

  def router_logits(self, tokens: jax.Array) -> jax.Array:
    """[T, H] -> [T, E] float32. HIGHEST precision: the default lets GPUs use TF32 for float32 dots, and
    routing is discrete, so a few flipped picks would change whole output rows."""
    return jnp.dot(tokens.astype(jnp.float32), self.router_weight[...].astype(jnp.float32).T,
                   precision=jax.lax.Precision.HIGHEST)

  def quantize_activations(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[T, H] -> (float8_e4m3fn [T, H], float32 [H/128, T] in the public transposed layout)."""
    q = quant.quantize_blockwise(tokens, (1, self.config.block))
    return q.values, quant.activation_scale_to_public(q.scales)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., H] activations (bfloat16) -> [..., H] in `dtype` (bfloat16); leading axes are flattened to tokens.

    Raises:
      ValueError / TypeError: x's last axis is not H, or x is not floating point.
    """
    hidden = self.config.hidden
    if x.ndim < 1 or x.shape[-1] != hidden:
      raise ValueError(f"x must have shape [..., H] with H={hidden}, got {list(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"x must be floating point (bfloat16), got {x.dtype}")
    tokens = x.reshape(-1, hidden)
    hidden_states, hidden_states_scale = self.quantize_activations(tokens)
    gemm1, gemm2 = self.gemm1.get_value(), self.gemm2.get_value()
    operands = (self.router_logits(tokens), self.e_score_correction_bias[...], hidden_states, hidden_states_scale,
                gemm1.values, gemm1.scales, gemm2.values, gemm2.scales)
    common = dict(routed_scaling_factor=self.routed_scaling_factor, config=self.config,
                  implementation=self.implementation, interpret=self.interpret,
                  intermediate_dtype=self.intermediate_dtype)
    if self.mesh is None:
      out = moe_layer(*operands, local_expert_offset=self.local_expert_offset, **common)
    else:
      from moe_pallas import sharding  # pylint: disable=import-outside-toplevel
      out = sharding.moe_layer_sharded(*operands, mesh=self.mesh, expert_axis=self.expert_axis,
                                       data_axis=self.data_axis, strategy=self.ep_strategy, **common)
    if self.shared_expert is not None:
      # As in DeepSeek-V3's reference: routed and shared outputs are each in bf16, then added.
      out = (out.astype(jnp.float32) + self.shared_expert(tokens, dtype=jnp.bfloat16).astype(jnp.float32))
    out = out.astype(self.dtype)
    if self.mesh is None:
      return out.reshape(x.shape)
    # The sharded layer returns its [tokens, H] rows split over the mesh; folding them back into x's
    # leading axes is a reshape JAX cannot infer a sharding for: give it x's own.
    return jax.lax.reshape(out, x.shape, out_sharding=jax.typeof(x).sharding)

  @classmethod
  def from_weights(cls, weights, **kwargs) -> "DeepSeekMoE":
    """A module holding `weights` (a `moe_pallas.checkpoint.MoELayerWeights`), without random init.

    Args:
      weights: from `moe_pallas.checkpoint.load_moe_layer`: config, offset, scaling factor, router, experts
        and, if present, the shared expert (stored dequantized in `shared_dtype`).
      **kwargs: the other keyword arguments of `DeepSeekMoE` (implementation, interpret, dtypes,
        expert_axis). Under a mesh the experts are placed sharded on `expert_axis`.
    """
    for name in ("config", "local_expert_offset", "routed_scaling_factor", "shared_intermediate", "rngs"):
      if name in kwargs:
        raise TypeError(f"from_weights takes {name} from the weights, not as an argument")
    shared_intermediate = 0 if weights.shared is None else weights.shared.gemm2.shape[-1]
    mesh = kwargs.pop("mesh", None)
    # The abstract module is built with no mesh in sight: Flax's eval_shape would otherwise attach a sharding
    # to every variable through `var.dtype`, which a BlockScaledArray value does not have. The experts are
    # then created below, sharded as `__init__` would have done.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
      module = nnx.eval_shape(lambda: cls(
          config=weights.config, rngs=nnx.Rngs(0), local_expert_offset=weights.local_expert_offset,
          routed_scaling_factor=weights.routed_scaling_factor, shared_intermediate=shared_intermediate, **kwargs))
    sharding = expert_sharding_metadata(module.expert_axis, mesh)
    module.mesh = _expert_parallel_mesh(weights.config, module.expert_axis, mesh)
    _check_layout_for_mesh(module.weights_layout, module.mesh)

    def expert_variable(name, a: quant.BlockScaledArray):
      expected = getattr(module, name).get_value()
      want = weight_layout.logical_shape(expected.values)
      if tuple(a.values.shape) != want or tuple(a.block_shape) != expected.block_shape:
        raise ValueError(f"weights.{name} has shape {list(a.values.shape)} and blocks {a.block_shape}, the "
                         f"module expects {list(want)} and {expected.block_shape}")
      value = quant.BlockScaledArray(jnp.asarray(a.values, quant.FP8_DTYPE), jnp.asarray(a.scales, jnp.float32),
                                     tuple(a.block_shape))
      return ExpertWeights(_in_layout(value, module.weights_layout), **sharding)

    module.gemm1 = expert_variable("gemm1", weights.gemm1)
    module.gemm2 = expert_variable("gemm2", weights.gemm2)
    # Everything else is replicated over the mesh, so that no call re-broadcasts it from one device.
    placement = mesh if mesh is not None else _context_mesh()
    replicate = ((lambda a: jax.device_put(a, jax.sharding.NamedSharding(placement, jax.P())))
                 if isinstance(placement, jax.sharding.Mesh) else (lambda a: a))
    router_dtype = module.router_weight.get_value().dtype
    module.router_weight = nnx.Param(replicate(jnp.asarray(weights.router_weight, router_dtype)))
    module.e_score_correction_bias = RoutingBias(replicate(jnp.asarray(weights.e_score_correction_bias, jnp.float32)))
    if weights.shared is not None:
      shared_dtype = module.shared_expert.down.get_value().dtype
      module.shared_expert.gate_up = nnx.Param(
          replicate(quant.dequantize(_as_jax(weights.shared.gemm1), shared_dtype)))
      module.shared_expert.down = nnx.Param(replicate(quant.dequantize(_as_jax(weights.shared.gemm2), shared_dtype)))
    return module

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, layer: int, *, local_expert_offset: int = 0,
                      num_local_experts: int | None = None, include_shared: bool = True,
                      **kwargs) -> "DeepSeekMoE":
    """Loads MoE layer `layer` of a DeepSeek-V3 Hugging Face checkpoint (see `moe_pallas.checkpoint`).

    Reads only that layer's router and experts offset .. offset + num_local_experts - 1 (all when None),
    and the shared expert when `include_shared`. **kwargs go to `DeepSeekMoE` as in `from_weights`.
    """
    from moe_pallas import checkpoint  # pylint: disable=import-outside-toplevel
    weights = checkpoint.load_moe_layer(path, layer, local_expert_offset=local_expert_offset,
                                        num_local_experts=num_local_experts, include_shared=include_shared)
    return cls.from_weights(weights, **kwargs)


def _as_jax(a: quant.BlockScaledArray) -> quant.BlockScaledArray:
  return quant.BlockScaledArray(jnp.asarray(a.values), jnp.asarray(a.scales), tuple(a.block_shape))


def to_linen(*, config: MoEConfig, name: str | None = None, **kwargs):
  """`DeepSeekMoE` as a Linen module, through `nnx.bridge.to_linen`: `to_linen(config=..., ...)`.

  Takes `DeepSeekMoE`'s keyword arguments except `rngs` (Linen's `init` key is used), plus the Linen `name`.
  Variables come in the collections "params" (router, shared expert), "fp8_experts" and "routing_bias";
  pass all of them to `apply`. `linen_variables(nnx_module)` converts a loaded NNX module's state into these
  collections. The bridge rebuilds the NNX module on every `apply` (its random init included) before loading
  the variables into it: run `apply` under `jax.jit`, where that init is dead code.

  Returns:
    A `flax.linen.Module` mapping [..., H] to [..., H] like `DeepSeekMoE.__call__`.
  """
  return nnx.bridge.to_linen(DeepSeekMoE, config=config, name=name, **kwargs)


def linen_variables(module: nnx.Module) -> dict:
  """An NNX module's state as the Linen variables `to_linen(...).apply` takes (same collections, paths)."""
  collections: dict[str, dict] = {}
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState))):
    collection = variablelib.variable_name_from_type(type(variable), allow_register=True)
    collections.setdefault(collection, {})[path] = bridge_variables.to_linen_var(variable)
  return {name: nnx.traversals.unflatten_mapping(flat) for name, flat in collections.items()}
