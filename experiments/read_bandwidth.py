"""What HBM read bandwidth a streaming kernel reaches on this GPU: the ceiling a memory-bound GEMM can hope for.

SPEC.md's floor uses the measured copy bandwidth (read + write). Our weight-streaming GEMMs only read, so
the ceiling that matters for them is the read rate: here an XLA reduction (max over uint32) of `--gib` GiB,
and a copy of the same array for comparison, each timed by `GpuTimer` (L2 flushed before every call,
median GPU span).

    PYTHONPATH=. python3 experiments/read_bandwidth.py --gib=1
"""

from __future__ import annotations

import json
import statistics

from absl import app, flags

_GIB = flags.DEFINE_float("gib", 1.0, "Array size in GiB.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls.")
_OUT = flags.DEFINE_string("out", "", "JSONL output (optional).")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from experiments.timing import GpuTimer

  nbytes = int(_GIB.value * 2**30)
  x = jax.random.bits(jax.random.key(0), (nbytes // 4,), jnp.uint32)
  timer = GpuTimer()
  probes = {
      "read_max": (jax.jit(jnp.max), nbytes),
      "copy": (jax.jit(lambda a: a ^ jnp.uint32(1)), 2 * nbytes),
  }
  rows = []
  for name, (fn, moved) in probes.items():
    times = timer.time_calls(fn, (x,), iters=_ITERS.value, warmup=2)
    span = statistics.median(times.span_us)
    row = dict(probe=name, bytes=moved, span_us=round(span, 2), tb_per_s=round(moved / span / 1e6, 3),
               device=jax.devices()[0].device_kind)
    rows.append(row)
    print(json.dumps(row), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  app.run(main)
