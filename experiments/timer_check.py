r"""Checks the GPU timer of experiments/timing.py against known rates and the host clock.

  PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/timer_check.py

Prints the profile's device planes and lines (what the timer parses), then for a bf16 8192^3 XLA matmul
(~700-800 TFLOP/s on H100), a program of many small kernels (where the span and the kernel sum differ),
and a 1 GiB device copy: the GPU span, the kernel-duration sum, and host wall time per call with and without
the L2 flush, so a broken split (too few/many kernels per call, flush counted) shows at once.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app
from absl import flags

_SHOW_EVENTS = flags.DEFINE_integer("show_events", 6, "Device events to print from the raw profile.")


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
  import jax
  import jax.numpy as jnp

  from experiments import timing

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
  if device.platform != "gpu":
    print("no GPU: nothing to check")
    return

  timer = timing.GpuTimer(device=device)
  print(f"flush calibration: {timer.flush_kernels_per_call} kernel(s) per flush, names {sorted(timer.flush_names)}")

  # The raw profile of one flush + one matmul, as the timer sees it.
  n = 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(jnp.bfloat16)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, b))
  for level in (0, 1, 2):
    timer.host_tracer_level = level
    import glob
    import tempfile
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.host_tracer_level = level
    with tempfile.TemporaryDirectory() as d:
      jax.profiler.start_trace(d, profiler_options=options)
      timer.flusher()
      jax.block_until_ready(matmul(a, b))
      jax.profiler.stop_trace()
      path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
      profile = jax.profiler.ProfileData.from_file(path)
      print(f"--- host_tracer_level={level}: planes {[p.name for p in profile.planes]}")
      for p in profile.planes:
        if not p.name.startswith("/device:GPU"):
          continue
        for line in p.lines:
          events = list(line.events)
          print(f"  {p.name} line {line.name!r}: {len(events)} events")
          for ev in events[:_SHOW_EVENTS.value]:
            stats = {k: v for k, v in ev.stats}
            keep = {k: stats[k] for k in ("hlo_module", "hlo_op", "correlation_id", "program_id") if k in stats}
            print(f"    {ev.name[:60]!r} start={ev.start_ns:.0f} dur={ev.duration_ns:.0f}ns {keep} "
                  f"(stat keys: {sorted(stats)[:12]})")
  timer.host_tracer_level = 1

  def report(label, fn, args, flops=None, nbytes=None, iters=20):
    t = timer.time_calls(fn, args, iters=iters, warmup=3)
    host = []
    for _ in range(iters):
      timer.flusher()
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      host.append((time.perf_counter() - t0) * 1e6)
    s = t.summary()
    line = (f"{label}: span {s['time_us']:.1f}us (min {s['time_min_us']:.1f}, max {s['time_max_us']:.1f}), "
            f"kernel sum {s['kernel_sum_us']:.1f}us, {s['num_kernels']} kernels/call, split={s['timing_split']}, "
            f"host clock {statistics.median(host):.1f}us")
    if flops:
      line += f", {flops / (s['time_us'] * 1e-6) / 1e12:.0f} TFLOP/s"
    if nbytes:
      line += f", {nbytes / (s['time_us'] * 1e-6) / 1e12:.3f} TB/s"
    print(line, flush=True)
    return t

  report("bf16 matmul 8192^3", matmul, (a, b), flops=2 * n**3)
  a8, b8 = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
  fp8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                 preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  report("fp8 XLA dot 8192^3 (NT)", fp8, (a8, b8), flops=2 * n**3)

  def chain(x):
    for i in range(30):  # 30 dependent small kernels: the span includes the launch gaps, the sum does not
      x = jnp.sin(x) * (i + 1) + jnp.cumsum(x, axis=0)[::-1]
    return x
  report("30-step chain of small kernels [256, 256]", jax.jit(chain), (jnp.ones((256, 256), jnp.float32),))
  x = jnp.zeros((2**28,), jnp.uint32)
  report("1 GiB elementwise copy", jax.jit(lambda x: x ^ jnp.uint32(1)), (x,), nbytes=2 * 2**30)
  print("copy bandwidth:", {k: (v / 1e12 if k.endswith("Bps") else v)
                            for k, v in timing.measure_copy_bandwidth(timer).items()})


if __name__ == "__main__":
  app.run(main)
