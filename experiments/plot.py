r"""Plots benchmark JSONL files: time vs T against the floor, and a roofline panel.

  PYTHONPATH=. python3 experiments/plot.py --inputs=experiments/results/h100_xla.jsonl,experiments/results/h100_triton.jsonl \
      --out=experiments/results/h100.png

Left: GPU time per call vs T (log-log), one line per implementation x scenario, the floor of the same
draws dashed. Right: roofline, arithmetic intensity (FLOP per byte of the floor's traffic) vs achieved
TFLOP/s, under the ceilings min(matrix rate, intensity x copy bandwidth) from the run's header.
"""

from __future__ import annotations

import pathlib

from absl import app
from absl import flags

from experiments import tables

_INPUTS = flags.DEFINE_list("inputs", None, "Benchmark JSONL files.", required=True)
_OUT = flags.DEFINE_string("out", None, "PNG path (default: the first input with .png).")
_TITLE = flags.DEFINE_string("title", None, "Figure title (default: the device of the first header).")

_MARKERS = {"uniform": "o", "all_local": "s", "skewed": "^", "no_local": "x"}
_LINESTYLES = {"uniform": "-", "all_local": "--", "skewed": ":", "no_local": "-."}


def plot(headers, rows, out_path, title=None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(15, 6.2))
  impls = sorted({r["implementation"] for r in rows})
  colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
  scenarios = sorted({r["scenario"] for r in rows}, key=lambda s: list(_MARKERS).index(s) if s in _MARKERS else 9)

  for scen in scenarios:
    marker = _MARKERS.get(scen, "D")
    # One floor per scenario: it depends on the draw only, not on the implementation.
    floors = {}
    for r in rows:
      if r["scenario"] == scen:
        floors[r["T"]] = r["floor_us"]
    ts = sorted(floors)
    ax_t.plot(ts, [floors[t] for t in ts], color="black", linestyle=_LINESTYLES.get(scen, "-"), alpha=0.6,
              linewidth=1.2, label=f"floor ({scen})")
    for impl in impls:
      sel = sorted((r for r in rows if r["scenario"] == scen and r["implementation"] == impl), key=lambda r: r["T"])
      if not sel:
        continue
      ax_t.plot([r["T"] for r in sel], [r["time_us"] for r in sel], marker=marker, color=colors[impl],
                linestyle=_LINESTYLES.get(scen, "-"), markersize=4, label=f"{impl} ({scen})")
      sel = [r for r in sel if r.get("flops")]  # the empty call has no intensity
      ax_r.scatter([r["arithmetic_intensity"] for r in sel], [r["tflops"] for r in sel], marker=marker,
                   color=colors[impl], s=22, label=f"{impl} ({scen})")
  ax_t.set_xscale("log")
  ax_t.set_yscale("log")
  ax_t.set_xlabel("tokens T")
  ax_t.set_ylabel("GPU time per call (µs)")
  ax_t.set_title("time vs T (L2 flushed, median)")
  ax_t.grid(True, which="both", alpha=0.3)
  ax_t.legend(fontsize=7)

  header = headers[0] if headers else {}
  bw = header.get("copy_bw_Bps")
  rate = header.get("matrix_flops")
  intensities = [r["arithmetic_intensity"] for r in rows if r.get("flops")]
  if bw and rate and intensities:
    ridge = rate / bw
    lo, hi = min(intensities) / 2, max(max(intensities), ridge) * 2
    xs = sorted({lo, hi, max(ridge, lo)})
    ax_r.plot(xs, [min(rate, x * bw) / 1e12 for x in xs], color="black", linewidth=1.2,
              label=f"ceiling: {bw / 1e12:.2f} TB/s, {rate / 1e12:.0f} TFLOP/s")
  ax_r.set_xscale("log")
  ax_r.set_yscale("log")
  ax_r.set_xlabel("arithmetic intensity (FLOP / byte of the floor's traffic)")
  ax_r.set_ylabel("achieved TFLOP/s")
  ax_r.set_title("roofline")
  ax_r.grid(True, which="both", alpha=0.3)
  ax_r.legend(fontsize=7)

  device = header.get("device", "?")
  cfg = header.get("config", {})
  shape = f"H={cfg.get('hidden')} I={cfg.get('intermediate')} E={cfg.get('num_experts')}/{cfg.get('num_local_experts')}"
  fig.suptitle(title or f"moe_pallas FP8 block-scale MoE layer ({shape}) on {device}, "
               f"jax {header.get('jax_version', '?')}, synthetic routing", fontsize=11)
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path


def main(argv):
  del argv
  headers, rows = tables.benchmark_rows(_INPUTS.value)
  if not rows:
    raise app.UsageError(f"no ok rows in {_INPUTS.value}")
  out = _OUT.value or str(pathlib.Path(_INPUTS.value[0]).with_suffix(".png"))
  plot(headers, rows, out, _TITLE.value)
  print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
  app.run(main)
