r"""What one call of the jitted layer costs the host, against a trivial program and the L2 flush.

The pipelined figure (`benchmark.py`, `timing.time_pipelined`) counts the host where the device waits for
it: at T=1 and 7 the device does ~50 us a call and the flush ~135 us, so when the host needs longer than
~185 us to enqueue a flush and a call, the round times the host (`pipelined_host_bound_rounds`). On one
H200 machine the same code enqueued flush + call in 138 us, on another in 230 us (session 14). This
script splits that time: for each program, --rounds rounds of --calls calls enqueued with no wait (the
host's time until the last call returned), each round ended by one block_until_ready, and the median per
call reported. Programs:

  trivial_1arg   jit(x + 1) of one small array: JAX's dispatch floor on this host
  trivial_10arg  the same on the layer's 10 arguments (weights included; keep_unused): what the arguments cost
    _recomputed  ... each argument written by a program on the device instead of transferred from the host
    _host<i>     ... all recomputed but argument i
  flush          the benchmark's chained, donated 256 MiB L2 flush (timing.ChainedFlusher.enqueue)
  layer_T<T>     the benchmark's jitted layer (offset and scaling traced), one per --tokens (and _recomputed)
  aot_T<T>       the same program compiled ahead of time (`jit(...).lower(...).compile()`), called directly

and, per layer, the instructions of its entry computation by opcode (each custom call or fusion is a
launch the host makes per call).

  PYTHONPATH=. python3 experiments/dispatch_cost.py --tokens=1,7,16 --jsonl=$OUT/dispatch.jsonl
  PYTHONPATH=. python3 experiments/dispatch_cost.py --cpu            # CPU, small shape, interpret mode
"""

from __future__ import annotations

import collections
import os
import re
import statistics
import time

from absl import app
from absl import flags

_TOKENS = flags.DEFINE_list("tokens", ["1", "7", "16"], "Token counts T of the layer programs.")
_CALLS = flags.DEFINE_integer("calls", 30, "Calls per round (few enough that the runtime's queue never "
                              "makes the host wait).")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "Rounds per program (the median per call is reported).")
_CPU = flags.DEFINE_bool("cpu", False, "CPU, small shape, interpret mode, 1 MiB flush.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "Write each layer's optimized HLO here (optional).")
_JSONL = flags.DEFINE_string("jsonl", "", "JSONL output (optional; benchmark.py, imported here, owns --out).")


def enqueue_cost(call, *, calls: int, rounds: int) -> dict:
  """Host microseconds per call of `call()` enqueued back to back (median over rounds, and the rounds), and
  the round's wall time per call once its last output is ready. One untimed call first (compile, warm-up)."""
  import jax
  if calls < 1 or rounds < 1:
    raise ValueError(f"calls and rounds must be >= 1, got calls={calls}, rounds={rounds}")
  jax.block_until_ready(call())
  enqueue, wall = [], []
  for _ in range(rounds):
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
      out = call()
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    enqueue.append((t1 - t0) / calls * 1e6)
    wall.append((t2 - t0) / calls * 1e6)
  return dict(enqueue_us=statistics.median(enqueue), enqueue_min_us=min(enqueue), wall_us=statistics.median(wall),
              enqueue_rounds_us=enqueue)


def entry_opcodes(hlo_text: str) -> dict:
  """Opcode -> count over the ENTRY computation of an optimized HLO module's text (parameters, tuples and
  constants included: the caller sees every one)."""
  counts = collections.Counter()
  in_entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY "):
      in_entry = True
      continue
    if in_entry:
      if line.startswith("}"):
        break
      # `%name = <shape> opcode(...)`, the shape a tuple `(...)` for multi-output instructions; a custom
      # call is counted under its target.
      m = re.search(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9-]*)\(", line)
      if m:
        target = re.search(r'custom_call_target="([^"]+)"', line)
        counts[f"custom-call {target.group(1)}" if target else m.group(1)] += 1
  return dict(sorted(counts.items()))


def main(argv):
  del argv
  os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")  # as benchmark.py by default
  import jax
  import jax.numpy as jnp
  if _CPU.value:
    jax.config.update("jax_platforms", "cpu")
  from experiments import benchmark, tables, timing
  from moe_pallas import testing
  from moe_pallas.config import MoEConfig

  config = MoEConfig.small() if _CPU.value else MoEConfig.deepseek_v3()
  device = jax.devices()[0]
  weights = jax.block_until_ready(testing.random_weights(config, seed=0))
  results = []

  def record(name, res, **extra):
    row = dict(program=name, device=device.device_kind, **res, **extra)
    results.append(row)
    print(f"{name:>14}: enqueue {row['enqueue_us']:7.1f} us/call (min {row['enqueue_min_us']:.1f}), "
          f"wall {row['wall_us']:7.1f} us/call {extra.get('entry_opcodes', '')}", flush=True)

  kw = dict(calls=_CALLS.value, rounds=_ROUNDS.value)
  small = jax.device_put(jnp.ones((8,), jnp.float32), device)
  trivial = jax.jit(lambda x: x + 1)
  record("trivial_1arg", enqueue_cost(lambda: trivial(small), **kw))

  flusher = timing.ChainedFlusher(2**20 if _CPU.value else 256 * 2**20, [device])

  def flush():
    flusher.enqueue()
    return flusher.buffer
  record("flush", enqueue_cost(flush, **kw))

  layer = benchmark.jitted_layer("triton", config, _CPU.value, jnp.dtype(jnp.float8_e4m3fn))
  for t in _TOKENS.value:
    _, args = benchmark.jitted_layer_args(config, t, weights, device)
    # The same values, each written by a program on the device (as a model's activations are), not
    # transferred from the host: whether an argument's origin changes what each call costs the host.
    recomputed = jax.block_until_ready(jax.jit(lambda *a: tuple(jnp.copy(x) for x in a))(*args))
    if t == _TOKENS.value[0]:
      trivial10 = jax.jit(lambda *a: a[0] + 1, keep_unused=True)
      record("trivial_10arg", enqueue_cost(lambda: trivial10(*args), **kw))
      record("trivial_10arg_recomputed", enqueue_cost(lambda: trivial10(*recomputed), **kw))
      for i in range(len(args)):
        mixed = (*recomputed[:i], args[i], *recomputed[i + 1:])
        record(f"trivial_10arg_host{i}", enqueue_cost(lambda: trivial10(*mixed), **kw))
    compiled = layer.lower(*args).compile()
    opcodes = entry_opcodes(compiled.as_text())
    if _HLO_DIR.value:
      with open(os.path.join(_HLO_DIR.value, f"layer_T{t}.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    record(f"layer_T{t}", enqueue_cost(lambda: layer(*args), **kw), tokens=int(t), entry_opcodes=opcodes)
    record(f"layer_T{t}_recomputed", enqueue_cost(lambda: layer(*recomputed), **kw), tokens=int(t))
    record(f"aot_T{t}", enqueue_cost(lambda: compiled(*args), **kw), tokens=int(t))
  if _JSONL.value:
    tables.write_jsonl(_JSONL.value, results)


if __name__ == "__main__":
  app.run(main)
