"""The benchmark's workloads: the 19 public (T, local_expert_offset) pairs, extra T values, routing scenarios.

Routing is synthetic (the public benchmark's captured logits are not available) and drawn with a fixed
seed per (T, offset, scenario), so that every run and every implementation sees the same routing:

- `uniform`: `moe_pallas.testing.random_activations(scenario="uniform")` (logits N(0, 1), bias N(0, 0.1)).
  A small T often has no local pair (T=1: about half the draws), which would time only overhead, so the
  scenario takes the first seed, counting up from the workload's base seed, whose draw has >= 1 local pair.
- `skewed`, `all_local`, `no_local`: `random_activations` with that scenario and the base seed (see
  moe_pallas/testing.py: two hot local experts; every pick local; no pick local, the empty call, for any T).

Each draw records its local pairs and experts touched (routing with `moe_pallas.routing.route`), which the
floor needs. Activations (FP8 hidden states and scales) are fresh per trial: trial 0 uses the draw's seed,
trial k another seed derived from it; the routing logits and bias stay the draw's.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from moe_pallas.config import MoEConfig
from moe_pallas.routing import route

ROUTED_SCALING_FACTOR = 2.5
SCENARIOS = ("uniform", "skewed", "all_local", "no_local")

# (T, local_expert_offset) of the public benchmark (SPEC.md), at DeepSeek-V3's E=256, E_local=32.
PUBLIC = ((1, 32), (7, 192), (14, 0), (15, 32), (16, 224), (32, 32), (52, 160), (53, 32), (54, 128),
          (55, 128), (56, 64), (57, 96), (58, 64), (59, 160), (62, 96), (80, 96), (901, 96), (11948, 128),
          (14107, 32))
# More points for the time-vs-T curve; offsets spread over the 8 ranks.
EXTRA = ((128, 0), (512, 64), (2048, 96), (4096, 160), (32768, 224))
# What `--smoke` runs on the small shape: a tiny T, a T near the public median, one of several tiles.
SMOKE = ((1, 32), (57, 96), (200, 0))

_DEEPSEEK_LOCAL = 32
_MAX_SEED_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmark shape: T tokens on the rank whose local experts start at `local_expert_offset`."""

  num_tokens: int
  local_expert_offset: int
  group: str  # "public", "extra", "smoke" or "custom"
  routed_scaling_factor: float = ROUTED_SCALING_FACTOR

  @property
  def name(self) -> str:
    return f"T{self.num_tokens}@{self.local_expert_offset}"


def offset_for(config: MoEConfig, deepseek_offset: int) -> int:
  """Maps a DeepSeek-V3 offset (rank r = offset / 32 of 8) onto `config`'s ranks (r mod E/E_local)."""
  ranks = config.num_experts // config.num_local_experts
  return (deepseek_offset // _DEEPSEEK_LOCAL % ranks) * config.num_local_experts


def _table(group: str):
  return {"public": PUBLIC, "extra": EXTRA, "smoke": SMOKE}[group]


def select(spec: str, config: MoEConfig) -> list[Workload]:
  """Workloads from a comma list of `public`, `extra`, `smoke`, `all` (= public + extra), `T` or `T@offset`.

  A bare T takes its offset from the public or extra table, else 0. Offsets are given at DeepSeek-V3's
  geometry and mapped onto `config`'s ranks with `offset_for`.
  """
  known = {t: (off, g) for g in ("extra", "public") for t, off in _table(g)}
  out: list[Workload] = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    groups = ("public", "extra") if item == "all" else (item,) if item in ("public", "extra", "smoke") else ()
    if groups:
      for g in groups:
        out.extend(Workload(t, offset_for(config, off), g) for t, off in _table(g))
      continue
    if "@" in item:
      t, off = (int(v) for v in item.split("@"))
      group = "custom"
    else:
      t = int(item)
      off, group = known.get(t, (0, "custom"))
    if t < 1:
      raise ValueError(f"workload T must be >= 1, got {item!r}")
    out.append(Workload(t, offset_for(config, off), group))
  seen, unique = set(), []
  for w in out:
    if (w.num_tokens, w.local_expert_offset) not in seen:
      seen.add((w.num_tokens, w.local_expert_offset))
      unique.append(w)
  return unique


def base_seed(workload: Workload, scenario: str) -> int:
  """A seed fixed by (T, offset, scenario): stable across runs, machines and implementations."""
  return zlib.crc32(f"{workload.num_tokens}/{workload.local_expert_offset}/{scenario}".encode()) & 0x7FFFFFFF


@functools.partial(jax.jit, static_argnames=("config",))
def _routing_stats(routing_logits, routing_bias, local_expert_offset, *, config: MoEConfig):
  topk_ids, _ = route(routing_logits, routing_bias, config=config, routed_scaling_factor=ROUTED_SCALING_FACTOR)
  local = topk_ids - local_expert_offset
  is_local = (local >= 0) & (local < config.num_local_experts)
  per_expert = jnp.zeros((config.num_local_experts + 1,), jnp.int32).at[
      jnp.where(is_local, local, config.num_local_experts)].add(1)[:config.num_local_experts]
  return per_expert


@dataclasses.dataclass
class Draw:
  """One workload x scenario: the routing (fixed) and trial-0 activations, with the routing's statistics."""

  config: MoEConfig
  workload: Workload
  scenario: str
  seed: int
  seeds_tried: int
  routing_logits: jax.Array
  routing_bias: jax.Array
  hidden_states: jax.Array
  hidden_states_scale: jax.Array
  pairs_per_expert: np.ndarray  # [E_local] local pairs of each local expert

  @property
  def pairs(self) -> int:
    return int(self.pairs_per_expert.sum())

  @property
  def experts_touched(self) -> int:
    return int((self.pairs_per_expert > 0).sum())

  @property
  def max_pairs_per_expert(self) -> int:
    return int(self.pairs_per_expert.max())

  def activations(self, trial: int = 0):
    """(routing_logits, routing_bias, hidden_states, hidden_states_scale) of `trial` (fresh FP8 activations)."""
    if trial == 0:
      return self.routing_logits, self.routing_bias, self.hidden_states, self.hidden_states_scale
    from moe_pallas import testing
    _, _, hs, hss = testing.random_activations(self.config, self.workload.num_tokens,
                                               seed=self.seed + 7919 * trial, scenario="uniform",
                                               local_expert_offset=self.workload.local_expert_offset)
    return self.routing_logits, self.routing_bias, hs, hss

  def describe(self) -> dict:
    return dict(seed=self.seed, seeds_tried=self.seeds_tried, pairs=self.pairs,
                experts_touched=self.experts_touched, max_pairs_per_expert=self.max_pairs_per_expert)


def draw(config: MoEConfig, workload: Workload, scenario: str) -> Draw:
  """The fixed routing draw of `workload` under `scenario` (see the module docstring)."""
  from moe_pallas import testing
  if scenario not in SCENARIOS:
    raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
  t, off = workload.num_tokens, workload.local_expert_offset
  seed0 = base_seed(workload, scenario)
  for tries in range(1, _MAX_SEED_TRIES + 1):
    seed = seed0 + tries - 1
    logits, bias, hs, hss = testing.random_activations(config, t, seed=seed, scenario=scenario,
                                                       local_expert_offset=off)
    per_expert = np.asarray(_routing_stats(logits, bias, jnp.int32(off), config=config))
    pairs = int(per_expert.sum())
    if scenario == "uniform" and pairs == 0:
      continue
    if scenario == "no_local" and pairs != 0:
      raise RuntimeError(f"{workload.name} no_local: the draw has {pairs} local pairs")
    return Draw(config, workload, scenario, seed, tries, logits, bias, hs, hss, per_expert)
  raise RuntimeError(f"{workload.name} {scenario}: no draw with a local pair in {_MAX_SEED_TRIES} seeds")
