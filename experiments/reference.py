"""Independent references for the experiments: which one checks a row, and computing it.

Kinds:
  "oracle":        the float64 NumPy oracle (`moe_pallas.testing.oracle`) on every token, on the host;
  "oracle_subset": the oracle on a seeded sample of tokens (the layer is row-independent, so a token subset
                   is an exact sub-problem; all tokens when T is at most the sample size);
  "xla":           the xla path on the device, float32 output, highest matmul precision;
  "none":          no check.
`kind_for` turns a requested kind ("auto" included) into one of these for an implementation and T, never
checking a path against itself.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import numpy as np

KINDS = ("auto", "oracle", "oracle_subset", "xla", "none")


def kind_for(requested: str, implementation: str, num_tokens: int, *, oracle_max_tokens: int) -> str:
  """The reference kind of one row: "auto" is the oracle up to `oracle_max_tokens`, the xla path above;
  the xla implementation is never checked against itself (it gets the oracle on a token sample)."""
  if requested not in KINDS:
    raise ValueError(f"reference kind {requested!r} must be one of {KINDS}")
  kind = requested
  if kind == "auto":
    kind = "oracle" if num_tokens <= oracle_max_tokens else "xla"
  if kind == "xla" and implementation == "xla":
    kind = "oracle_subset"
  return kind


def sample_rows(num_tokens: int, count: int, *, seed: int) -> np.ndarray | None:
  """Sorted token rows of a seeded sample of `count` tokens; None (every token) when T <= count."""
  if num_tokens <= count:
    return None
  return np.sort(np.random.default_rng(seed).choice(num_tokens, size=count, replace=False))


def oracle(activations, weights, *, config, local_expert_offset: int, routed_scaling_factor: float,
           rows: np.ndarray | None = None) -> np.ndarray:
  """The float64 oracle's output [len(rows) or T, H] for host or device arrays; `rows` picks tokens."""
  from moe_pallas.testing.oracle import oracle_moe  # here, so that importing this module leaves jax unloaded
  logits, bias, hs, hss = (np.asarray(a) for a in activations)
  if rows is not None:
    logits, hs, hss = logits[rows], hs[rows], hss[:, rows]
  return np.asarray(oracle_moe(logits, bias, hs, hss, *(np.asarray(w) for w in weights),
                               local_expert_offset=local_expert_offset, routed_scaling_factor=routed_scaling_factor,
                               top_k=config.top_k, n_group=config.n_group, topk_group=config.topk_group))


class References:
  """Independent references for one benchmark run (one weight set, many draws).

  Oracle references run on the host in a thread pool, submitted for every draw before the GPU rows start,
  so the float64 work (about 1 s per touched DeepSeek-V3 expert, mostly NumPy calls that release the GIL)
  overlaps compilation and timing instead of adding to the run's wall time. The xla reference runs on the
  device when a row asks for it.
  """

  def __init__(self, config, weights, *, requested: str, oracle_max_tokens: int, oracle_subset_tokens: int,
               workers: int):
    self._lock = threading.Lock()
    self.config = config
    self.weights = weights
    self.requested = requested
    self.oracle_max_tokens = oracle_max_tokens
    self.oracle_subset_tokens = oracle_subset_tokens
    self._host_weights = None
    self._futures = {}
    self._xla_fn = None
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="oracle")

  def kind_for(self, implementation: str, num_tokens: int) -> str:
    return kind_for(self.requested, implementation, num_tokens, oracle_max_tokens=self.oracle_max_tokens)

  def _host_weight_arrays(self):
    """Host copies of the weights; FP8 values widened to float64 once (exact) when RAM allows, so each
    oracle call skips the FP8 decode of every expert it touches."""
    with self._lock:
      if self._host_weights is None:
        self._host_weights = self._widen(*(np.asarray(w) for w in self.weights))
      return self._host_weights

  @staticmethod
  def _widen(w1, s1, w2, s2):
    try:
      ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
      ram = 0
    if 8 * (w1.size + w2.size) < ram // 4:
      w1, w2 = w1.astype(np.float64), w2.astype(np.float64)
    return w1, s1, w2, s2

  def submit(self, draw, kind: str):
    """Starts the reference of `draw` (oracle kinds on the pool); idempotent."""
    key = (draw.workload, draw.scenario, kind)
    if key in self._futures or kind in ("none", "xla"):
      return
    rows = None
    if kind == "oracle_subset":
      rows = sample_rows(draw.workload.num_tokens, self.oracle_subset_tokens, seed=draw.seed)
    activations = [np.asarray(a) for a in draw.activations(0)]
    label = "oracle_f64" if rows is None else f"oracle_f64_subset{len(rows)}"
    workload = draw.workload

    def job():
      weights = self._host_weight_arrays()  # the first job makes them; the others wait for it
      t0 = time.perf_counter()
      ref = oracle(activations, weights, config=self.config, local_expert_offset=workload.local_expert_offset,
                   routed_scaling_factor=workload.routed_scaling_factor, rows=rows)
      return ref, rows, label, time.perf_counter() - t0

    self._futures[key] = self._pool.submit(job)

  def get(self, draw, kind: str):
    """(reference [n, H], token rows it covers or None for all, label, seconds it took)."""
    if kind == "xla":
      t0 = time.perf_counter()
      ref = np.asarray(self._xla(draw))
      return ref, None, "xla_f32", time.perf_counter() - t0
    self.submit(draw, kind)
    return self._futures[(draw.workload, draw.scenario, kind)].result()

  def wait_all(self) -> float:
    """Blocks until every submitted host reference is done; returns the seconds waited."""
    t0 = time.perf_counter()
    concurrent.futures.wait(list(self._futures.values()))
    return time.perf_counter() - t0

  def release(self, draw):
    for key in [k for k in self._futures if k[:2] == (draw.workload, draw.scenario)]:
      del self._futures[key]

  def shutdown(self):
    self._pool.shutdown(wait=False, cancel_futures=True)

  def _xla(self, draw):
    import jax
    import jax.numpy as jnp

    from moe_pallas import apply_local_experts, plan_local, route
    cfg = self.config
    if self._xla_fn is None:
      @jax.jit
      def reference_f32(logits, bias, hs, hss, w1, s1, w2, s2, offset, scaling):
        ids, weights = route(logits, bias, config=cfg, routed_scaling_factor=scaling)
        plan = plan_local(ids, weights, local_expert_offset=offset, num_local_experts=cfg.num_local_experts)
        return apply_local_experts(hs, hss, w1, s1, w2, s2, plan, out_dtype=jnp.float32, implementation="xla")
      self._xla_fn = reference_f32
    with jax.default_matmul_precision("highest"):
      return self._xla_fn(*draw.activations(0), *self.weights, jnp.int32(draw.workload.local_expert_offset),
                          jnp.float32(draw.workload.routed_scaling_factor))
