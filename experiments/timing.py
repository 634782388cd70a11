"""GPU time of one jitted call, measured the way the public benchmark measures it.

Method (GPU): the calls run inside a `jax.profiler` session; XLA's CUPTI device tracer records every
kernel (and device memcpy/memset) with its GPU start and end timestamps on the `/device:GPU:N` plane, and
tags each with the `hlo_module` of the jitted program that launched it. Before every timed call a separate
jitted program (`jit_l2_flush`) rewrites a buffer of at least twice the L2 size, so every call starts with a
cold L2. Per call we keep the events of the timed program (those with an `hlo_module` other than the
flush's; un-annotated host<->device transfers done by a Python wrapper before the program are not the
program's GPU work and are dropped) and take the span from the first kernel's start to the last
kernel's end, so gaps between kernels (launch latency, host syncs inside the program) count, and the
median over the timed calls is reported. Warm-up calls run before the session starts.

Why not `jax.experimental.mosaic.gpu.profiler.measure`: its CUPTI hook returns per-kernel durations only
(no timestamps, so no span), adds them up by default, and makes an untimed warm-up call right before the
timed ones, which refills the L2 after any flush done outside the timed function.

Host-clock fallback (CPU smoke mode only): wall time around `block_until_ready`, labelled as such; it is
never a GPU measurement.

Caveat stated in every header: while a profiler session is active XLA runs command buffers (CUDA graphs)
thunk by thunk, so a profiled program runs like an unprofiled one only with command buffers off; the
benchmark turns them off by default (`--xla_gpu_enable_command_buffer=`), as the public benchmark uses no
CUDA graphs.

Pipelined mode (`time_pipelined`; what a model sees): the jitted program is called N times from Python with
no host wait in between, each call preceded by a donated L2-flush program that chains on the previous flush
(it takes the flush buffer and returns the rewritten one), so the device runs flush, call, flush, call, ...
back to back while the host keeps enqueueing. The loop ends with one `block_until_ready` on the last outputs;
per call = (wall time of that loop - wall time of the same loop with the flushes alone) / N, so the flushes,
the final host sync and the first dispatch's latency cancel, while launch gaps between the kernels of one
call, and host dispatch if it is slower than the device, count. Median over rounds. No profiler session is
active, so XLA command buffers run as configured (the benchmark header records whether they were on). On CPU
the same loop runs on the host (smoke mode, labelled as such).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLUSH_MODULE = "jit_l2_flush"
# 256 MiB: at least twice the L2 of every current NVIDIA datacenter GPU (H100/H200 50 MB, B200 126 MB).
DEFAULT_FLUSH_BYTES = 256 * 2**20
# Derived timeline lines that XLA's post-processing may add to a device plane: they duplicate the kernels.
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Ops", "Framework Name Scope",
                  "Source code", "Launch Stats", "TensorFlow Name Scope", "TensorFlow Ops")

GPU_METHOD = ("gpu_span: jax.profiler (XLA CUPTI device tracer) per-kernel GPU timestamps; per call "
              "last kernel end - first kernel start of the timed program, L2-flush kernels dropped; "
              "L2 flushed by a separate jitted write of {flush_mib} MiB before every call; median of the "
              "timed calls after untimed warm-up calls; XLA command buffers {command_buffers}")
HOST_METHOD = ("host_clock (CPU smoke mode only, NOT a GPU measurement): wall time around block_until_ready, "
               "median of the timed calls after warm-up")


@dataclasses.dataclass
class CallTimes:
  """Per-call measurements of one function (times in microseconds)."""

  span_us: list[float]           # first kernel start -> last kernel end, one entry per timed call
  kernel_sum_us: list[float]     # sum of kernel durations per call (<= span; the difference is gaps)
  num_kernels: int | None        # device events per call (kernels + memcpy/memset)
  kernels: list[tuple[str, float]]  # (name, median duration µs) per kernel of one call, in launch order
  method: str                    # how the calls were separated: "hlo_module", "flush_pattern" or "host_clock"
  wall_s: float                  # host wall time of the timed loop

  @property
  def median_us(self) -> float:
    return statistics.median(self.span_us)

  def summary(self) -> dict[str, Any]:
    spans = sorted(self.span_us)
    return dict(time_us=self.median_us, time_min_us=spans[0], time_max_us=spans[-1],
                time_p10_us=float(np.percentile(spans, 10)), time_p90_us=float(np.percentile(spans, 90)),
                kernel_sum_us=statistics.median(self.kernel_sum_us) if self.kernel_sum_us else None,
                num_kernels=self.num_kernels, iters_timed=len(self.span_us), timing_split=self.method,
                timed_loop_wall_s=self.wall_s)


def _block(x):
  return jax.block_until_ready(x)


def l2_flush(buffer):
  """Reads and rewrites every element: evicts whatever the previous call left in L2."""
  return buffer + jnp.uint32(1)


class L2Flusher:
  """Holds a device buffer of `nbytes` and rewrites it in place (donated) on every call."""

  def __init__(self, nbytes: int = DEFAULT_FLUSH_BYTES, device=None):
    self.nbytes = int(nbytes)
    self._buffer = jax.device_put(jnp.zeros((self.nbytes // 4,), jnp.uint32), device)
    self._fn = jax.jit(l2_flush, donate_argnums=0)
    self()

  def __call__(self):
    self._buffer = _block(self._fn(self._buffer))


@dataclasses.dataclass
class _Event:
  name: str
  start_ns: float
  end_ns: float
  module: str | None


def _device_events(profile, device_id: int) -> list[_Event]:
  """Kernel / memcpy events of one GPU from a `jax.profiler.ProfileData`, sorted by start."""
  plane = None
  wanted = f"/device:GPU:{device_id}"
  for p in profile.planes:
    if p.name == wanted or (p.name.startswith(wanted) and not p.name[len(wanted)].isdigit()):
      plane = p
  if plane is None:
    names = [p.name for p in profile.planes]
    raise RuntimeError(f"no {wanted} plane in the profile (planes: {names}); is CUPTI available?")
  events = []
  lines = list(plane.lines)
  stream_lines = [l for l in lines if l.name.startswith("Stream")]
  for line in stream_lines or [l for l in lines if l.name not in _DERIVED_LINES]:
    for ev in line.events:
      stats = dict(ev.stats)
      module = stats.get("hlo_module")
      events.append(_Event(ev.name, float(ev.start_ns), float(ev.start_ns) + float(ev.duration_ns),
                           None if module is None else str(module)))
  events.sort(key=lambda e: (e.start_ns, e.end_ns))
  return events


def _split_calls(events: Sequence[_Event], iters: int, flush_names: set[str],
                 flush_kernels_per_call: int) -> tuple[list[list[_Event]], str]:
  """Splits the event stream flush, call, flush, call, ... into the calls' own events."""
  if any(e.module is not None and e.module.startswith(FLUSH_MODULE) for e in events):
    # Events without an hlo_module were not launched by a jitted program: host<->device transfers that a
    # Python wrapper does before the program (e.g. jnp.asarray of a scalar argument). They are not the
    # program's GPU work, and counting them would stretch the span over host-side validation time.
    calls, current = [], []
    for e in events:
      if e.module is None:
        continue
      if e.module.startswith(FLUSH_MODULE):
        if current:
          calls.append(current)
        current = []
      else:
        current.append(e)
    if current:
      calls.append(current)
    return calls, "hlo_module"
  # No hlo_module stats: the stream is exactly (flush kernels, call kernels) x iters.
  per_iter, rem = divmod(len(events), iters)
  if rem or per_iter <= flush_kernels_per_call:
    raise RuntimeError(f"cannot split {len(events)} device events into {iters} calls of "
                       f"{flush_kernels_per_call} flush kernels + the call's kernels")
  calls = []
  for i in range(iters):
    chunk = events[i * per_iter:(i + 1) * per_iter]
    flush, call = chunk[:flush_kernels_per_call], chunk[flush_kernels_per_call:]
    if any(e.name not in flush_names for e in flush):
      raise RuntimeError(f"call {i}: expected flush kernels {sorted(flush_names)}, got {[e.name for e in flush]}")
    calls.append(list(call))
  return calls, "flush_pattern"


class GpuTimer:
  """Times jitted calls on one GPU with an L2 flush before each (see the module docstring)."""

  def __init__(self, *, device=None, flush_bytes: int = DEFAULT_FLUSH_BYTES, command_buffers: str = "off",
               host_tracer_level: int = 1):
    self.device = device or jax.devices()[0]
    self.flusher = L2Flusher(flush_bytes, self.device)
    self.host_tracer_level = host_tracer_level
    self.method = GPU_METHOD.format(flush_mib=flush_bytes / 2**20, command_buffers=command_buffers)
    self.flush_names: set[str] = set()
    self.flush_kernels_per_call = 0
    self._calibrate_flush()

  def _profile(self, body: Callable[[], None]) -> list[_Event]:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.host_tracer_level = self.host_tracer_level
    with tempfile.TemporaryDirectory(prefix="moe_bench_trace_") as log_dir:
      jax.profiler.start_trace(log_dir, profiler_options=options)
      try:
        body()
      finally:
        jax.profiler.stop_trace()
      paths = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
      if len(paths) != 1:
        raise RuntimeError(f"expected one .xplane.pb under {log_dir}, found {paths}")
      profile = jax.profiler.ProfileData.from_file(paths[0])
      return _device_events(profile, self.device.id)

  def _calibrate_flush(self):
    """Learns the flush program's kernel names and count, for profiles that lack hlo_module stats."""
    events = self._profile(lambda: [self.flusher() for _ in range(2)])
    if not events or len(events) % 2:
      raise RuntimeError(f"L2 flush calibration saw {len(events)} device events for 2 flushes")
    self.flush_names = {e.name for e in events}
    self.flush_kernels_per_call = len(events) // 2

  def time_calls(self, fn: Callable[..., Any], args: Sequence[Any], *, iters: int, warmup: int,
                 max_seconds: float | None = None, min_iters: int = 3) -> CallTimes:
    """Median GPU span of `fn(*args)` over up to `iters` calls (fewer if `max_seconds` of wall time pass)."""
    for _ in range(warmup):
      self.flusher()
      _block(fn(*args))
    done = 0
    wall = 0.0

    def body():
      nonlocal done, wall
      t0 = time.perf_counter()
      while done < iters:
        self.flusher()
        _block(fn(*args))
        done += 1
        if max_seconds is not None and done >= min_iters and time.perf_counter() - t0 > max_seconds:
          break
      wall = time.perf_counter() - t0

    events = self._profile(body)
    calls, split = _split_calls(events, done, self.flush_names, self.flush_kernels_per_call)
    if len(calls) != done:
      raise RuntimeError(f"profile holds {len(calls)} calls of the timed program, expected {done}")
    spans = [(max(e.end_ns for e in c) - min(e.start_ns for e in c)) / 1e3 for c in calls]
    sums = [sum(e.end_ns - e.start_ns for e in c) / 1e3 for c in calls]
    counts = {len(c) for c in calls}
    kernels = []
    if len(counts) == 1:
      n = counts.pop()
      for k in range(n):
        kernels.append((calls[0][k].name, statistics.median((c[k].end_ns - c[k].start_ns) / 1e3 for c in calls)))
      num_kernels = n
    else:
      num_kernels = int(statistics.median(len(c) for c in calls))
    return CallTimes(span_us=spans, kernel_sum_us=sums, num_kernels=num_kernels, kernels=kernels,
                     method=split, wall_s=wall)


class HostTimer:
  """CPU smoke mode: host wall clock around block_until_ready. Not a GPU measurement."""

  method = HOST_METHOD

  def __init__(self, *, device=None):
    self.device = device or jax.devices()[0]

  def time_calls(self, fn, args, *, iters: int, warmup: int, max_seconds: float | None = None,
                 min_iters: int = 1) -> CallTimes:
    for _ in range(warmup):
      _block(fn(*args))
    spans = []
    t_start = time.perf_counter()
    while len(spans) < iters:
      t0 = time.perf_counter()
      _block(fn(*args))
      spans.append((time.perf_counter() - t0) * 1e6)
      if max_seconds is not None and len(spans) >= min_iters and time.perf_counter() - t_start > max_seconds:
        break
    return CallTimes(span_us=spans, kernel_sum_us=[], num_kernels=None, kernels=[], method="host_clock",
                     wall_s=time.perf_counter() - t_start)


PIPELINED_WARMUP = 3  # pipelined calls (each after a flush) between the compiling call and the timed rounds
PIPELINED_METHOD = ("pipelined_{clock}: the jitted program called {iters} times from Python with no wait in "
                    "between, each call after a donated {flush_mib:g} MiB L2-flush program chained on the "
                    "previous one; per call = (wall time of that loop, ended by one block_until_ready on the last "
                    "outputs, - wall time of the same loop with the flushes alone) / {iters}; median of {rounds} "
                    "rounds (min recorded) after a compiling call and {warmup} warm-up calls")
_PIPELINED_CLOCKS = {"gpu": "device_wall (host wall clock of the device's queue)",
                     "cpu": "host_clock (CPU smoke mode only, NOT a GPU measurement)"}


def pipelined_method(platform: str, *, iters: int, rounds: int, flush_bytes: int) -> str:
  """The `pipelined_method` string of `time_pipelined` (also for a run's header, before any row is timed)."""
  clock = _PIPELINED_CLOCKS.get(platform, f"{platform}_wall (host wall clock)")
  return PIPELINED_METHOD.format(clock=clock, iters=iters, rounds=rounds, flush_mib=flush_bytes / 2**20,
                                 warmup=PIPELINED_WARMUP)


class ChainedFlusher:
  """L2 flushes that chain on the device without a host wait (pipelined timing).

  Unlike `L2Flusher`, `enqueue` does not block: each flush is a jitted rewrite that donates the buffer and
  returns the new one, so flush k+1 depends on flush k on the device and the host only enqueues. With several
  devices (the arguments of a sharded program) the buffer holds `nbytes` per device, sharded one block per
  device, so one dispatch flushes every device's L2 and costs the host no more per call than one device.
  """

  def __init__(self, nbytes: int, devices: Sequence[Any]):
    devices = list(devices)
    words = max(1, int(nbytes) // 4)
    if len(devices) == 1:
      sharding = jax.sharding.SingleDeviceSharding(devices[0])
    else:
      mesh = jax.sharding.Mesh(np.array(devices), ("flush",))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("flush"))
    self.nbytes = int(nbytes)
    self.devices = devices
    # Made on the devices by a program (no host array of nbytes x devices to transfer).
    self.buffer = jax.jit(lambda: jnp.zeros((len(devices) * words,), jnp.uint32), out_shardings=sharding)()
    self._fn = jax.jit(l2_flush, donate_argnums=0)  # its module is FLUSH_MODULE, as the GpuTimer's flush
    self.enqueue()
    self.sync()

  def enqueue(self):
    self.buffer = self._fn(self.buffer)

  def sync(self):
    _block(self.buffer)


def _arg_devices(args, device) -> list:
  """The devices of the call: `device` if given, else every device the arguments' jax.Arrays live on."""
  if device is not None:
    return [device]
  found = {}
  for leaf in jax.tree_util.tree_leaves(args):
    if isinstance(leaf, jax.Array):
      for d in leaf.devices():
        found[d.id] = d
  return [found[i] for i in sorted(found)] or [jax.devices()[0]]


def _pipelined_loop(flusher: ChainedFlusher, fn: Callable[..., Any] | None, args: Sequence[Any],
                    n: int) -> tuple[float, float]:
  """Seconds of `n` x (flush, fn(*args)) enqueued back to back, ended by one block_until_ready, and the
  seconds until the last one was enqueued (the host's part: near the whole when the host, not the device,
  set the pace).

  Only the last output is kept: rebinding `out` drops the previous call's outputs, which the runtime frees
  once that call has run (JAX dispatch is async, so every call is already enqueued when it returns).
  """
  flusher.sync()  # the device is idle when the clock starts (the previous loop ended with a block)
  out = None
  t0 = time.perf_counter()
  for _ in range(n):
    flusher.enqueue()
    if fn is not None:
      out = fn(*args)
  enqueued = time.perf_counter() - t0
  _block((out, flusher.buffer))
  return time.perf_counter() - t0, enqueued


# A round whose calls took the host this share of the loop's wall time or more was paced by the host: its
# per-call figure times the dispatch, not the device (`pipelined_host_bound_rounds`).
HOST_BOUND_SHARE = 0.9


def time_pipelined(fn, args, *, iters: int, rounds: int = 5, flush_bytes: int = DEFAULT_FLUSH_BYTES,
                   device=None) -> dict:
  """Per-call time of `fn(*args)` called back to back from Python (see the module docstring).

  `fn` should be a jitted program whose non-array parameters are traced arguments (as a model calls its
  layer), with `args` already on the device(s): a Python wrapper's host work, or a host-to-device copy per
  call, would count. The L2 flush runs on `device`, or when None on every device the arguments live on (one
  sharded flush program for a multi-device call). Round r times the flush-only loop, then the loop with the
  calls; per call = (loop - flush-only loop) / iters. A function much faster than the noise of the host
  clock can come out near zero or negative: `pipelined_rounds_us` shows the spread.

  Returns a dict: pipelined_us (median over rounds, µs per call), pipelined_min_us, pipelined_max_us,
  pipelined_rounds_us, pipelined_iters, pipelined_rounds, pipelined_flush_us (flush-only loop per call,
  median), pipelined_loop_us (flush + call per call, median), pipelined_enqueue_us (the host's time to
  enqueue flush + call, per call, median), pipelined_flush_enqueue_us (the same for the flush alone: the
  difference is what one call of `fn` costs the host), pipelined_host_bound_rounds (rounds whose enqueueing took
  HOST_BOUND_SHARE of their loop or more: those time the host), pipelined_first_call_s (compile + one run),
  pipelined_devices, pipelined_clock and pipelined_method.
  """
  if iters < 1 or rounds < 1:
    raise ValueError(f"iters and rounds must be >= 1, got iters={iters}, rounds={rounds}")
  devices = _arg_devices(args, device)
  flusher = ChainedFlusher(flush_bytes, devices)
  t0 = time.perf_counter()
  _block(fn(*args))  # compile (or a cache hit) + one run, outside every timed loop
  first_call_s = time.perf_counter() - t0
  _pipelined_loop(flusher, fn, args, PIPELINED_WARMUP)
  _pipelined_loop(flusher, None, args, PIPELINED_WARMUP)
  per_call, flush_only, loops, enqueues, flush_enqueues = [], [], [], [], []
  host_bound = 0
  for _ in range(rounds):
    flush_s, flush_enqueue_s = _pipelined_loop(flusher, None, args, iters)
    loop_s, enqueue_s = _pipelined_loop(flusher, fn, args, iters)
    per_call.append((loop_s - flush_s) / iters * 1e6)
    flush_only.append(flush_s / iters * 1e6)
    loops.append(loop_s / iters * 1e6)
    enqueues.append(enqueue_s / iters * 1e6)
    flush_enqueues.append(flush_enqueue_s / iters * 1e6)
    host_bound += enqueue_s >= HOST_BOUND_SHARE * loop_s
  platform = devices[0].platform
  return dict(pipelined_us=statistics.median(per_call), pipelined_min_us=min(per_call),
              pipelined_max_us=max(per_call), pipelined_rounds_us=per_call, pipelined_iters=iters,
              pipelined_rounds=rounds, pipelined_flush_us=statistics.median(flush_only),
              pipelined_loop_us=statistics.median(loops), pipelined_enqueue_us=statistics.median(enqueues),
              pipelined_flush_enqueue_us=statistics.median(flush_enqueues),
              pipelined_host_bound_rounds=host_bound, pipelined_first_call_s=first_call_s,
              pipelined_devices=len(devices),
              pipelined_clock="device_wall" if platform == "gpu" else "host_clock",
              pipelined_method=pipelined_method(platform, iters=iters, rounds=rounds, flush_bytes=flush_bytes))


def make_timer(*, gpu: bool, **kwargs):
  return GpuTimer(**kwargs) if gpu else HostTimer(device=kwargs.get("device"))


def _copy_elementwise(x):
  return x ^ jnp.uint32(1)


def _copy_plain(x):
  return jnp.copy(x)


def measure_copy_bandwidth(timer, *, nbytes: int = 2**30, iters: int = 10) -> dict[str, float]:
  """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (2 x nbytes per call).

  Two programs: an elementwise kernel (read, xor, write) and `jnp.copy` (XLA may lower it to a memcpy).
  The faster one is the copy bandwidth of the floor: a higher bandwidth makes the floor stricter.
  """
  x = jax.device_put(jnp.zeros((nbytes // 4,), jnp.uint32), timer.device)
  result = {}
  for label, fn in (("elementwise", _copy_elementwise), ("copy", _copy_plain)):
    jitted = jax.jit(fn)
    times = timer.time_calls(jitted, (x,), iters=iters, warmup=2)
    result[f"copy_bw_{label}_Bps"] = 2 * nbytes / (times.median_us * 1e-6)
  del x
  result["copy_bw_Bps"] = max(result["copy_bw_elementwise_Bps"], result["copy_bw_copy_Bps"])
  result["copy_bytes"] = 2 * nbytes
  return result


def measure_matmul_rate(timer, *, n: int = 8192, dtype=jnp.bfloat16, iters: int = 10) -> float:
  """FLOP/s of an n^3 XLA matmul (a sanity check of the timer: bf16 8192^3 on H100 is ~700-800 TFLOP/s)."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  if jnp.dtype(dtype).itemsize == 1:
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                  preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  else:
    fn = jax.jit(lambda a, b: a @ b)
  times = timer.time_calls(fn, (a, b), iters=iters, warmup=2)
  return 2 * n**3 / (times.median_us * 1e-6)
