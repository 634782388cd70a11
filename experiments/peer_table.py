r"""Our benchmark rows beside the peer's GEMM path from the same device call: the table and the issue's figures.

  PYTHONPATH=. python3 experiments/peer_table.py \
      --project_jsonl=$OUT/proj_uniform.jsonl,$OUT/proj_all_local.jsonl --peer_jsonl=$OUT/peer.jsonl

Per row (scenario, T): our `pipelined_us` (and its multiple of the floor), our kernel sum, the peer's GEMM
path (`kernels_only_sum_us` of `../shared/peer/side_by_side.py`: GEMM1 + SwiGLU/quant + GEMM2 + combine,
routing excluded), their ratio, our kernels grouped as routing / GEMM1 / GEMM2 / combine (+ other), and the
row's check. Then the geometric means over the public uniform rows (ours pipelined and summed, the peer's
against the same floors) and the rows where ours is faster. Both files must come from one device call
(the peer harness reads the project rows' draws and floors); a row the peer lacks is an error.
"""

from __future__ import annotations

import math
from typing import Iterable

from absl import app
from absl import flags

from experiments import tables

_PROJECT = flags.DEFINE_list("project_jsonl", None, "benchmark.py JSONL files (uniform, all_local).",
                             required=True)
_PEER = flags.DEFINE_string("peer_jsonl", None, "side_by_side.py JSONL of the same device call.", required=True)

HEADER = ("T", "scenario", "experts", "floor µs", "pipelined µs (×floor)", "kernel sum µs (kernels)",
          "peer GEMM path µs", "pipelined / peer", "ours: routing / GEMM1 / GEMM2 / combine (+ other) µs",
          "matched / rel_l2")


def timed_rows(paths) -> list[dict]:
  """benchmark.py's rows (ok) that carry a pipelined time."""
  _, rows = tables.benchmark_rows(paths)
  return [r for r in rows if r.get("pipelined_us") is not None]


def geomean(values) -> float:
  values = list(values)
  return math.exp(sum(math.log(v) for v in values) / len(values))


def compare(ours: list[dict], peer_records: Iterable[dict]) -> dict:
  """Per-row comparison and the summary: {"rows": [...], "geomean_pipelined", "geomean_kernel_sum",
  "geomean_peer" (over the uniform rows), "faster": [(scenario, T)], "slower": [(scenario, T, ratio)]}."""
  peer = {(r["scenario"], r["T"]): r for r in peer_records if "T" in r}
  rows = []
  for r in ours:
    key = (r["scenario"], r["T"])
    if key not in peer:
      raise ValueError(f"the peer file has no row {key}: run side_by_side.py on this benchmark's rows")
    peer_us = peer[key]["kernels_only_sum_us"]
    rows.append(dict(row=r, peer_us=peer_us, ratio=r["pipelined_us"] / peer_us,
                     groups=tables.kernel_groups(r["kernels"])))
  uniform = [x for x in rows if x["row"]["scenario"] == "uniform"]
  if not uniform:
    raise ValueError("no uniform rows: the geometric means are over the public uniform workloads")
  return dict(
      rows=rows,
      geomean_pipelined=geomean(x["row"]["pipelined_us"] / x["row"]["floor_us"] for x in uniform),
      geomean_kernel_sum=geomean(x["row"]["kernel_sum_us"] / x["row"]["floor_us"] for x in uniform),
      geomean_peer=geomean(x["peer_us"] / x["row"]["floor_us"] for x in uniform),
      faster=[(x["row"]["scenario"], x["row"]["T"]) for x in rows if x["ratio"] < 1],
      slower=[(x["row"]["scenario"], x["row"]["T"], x["ratio"]) for x in rows if x["ratio"] >= 1])


def table_cells(entry: dict) -> list[str]:
  r, g = entry["row"], entry["groups"]
  split = f"{g['routing']:.1f} / {g['gemm1']:.1f} / {g['gemm2']:.1f} / {g['combine']:.1f}"
  if g["other"] >= 0.05:
    split += f" (+{g['other']:.1f})"
  ratio = f"{entry['ratio']:.2f}"
  return [str(r["T"]), r["scenario"], str(r["experts_touched"]), f"{r['floor_us']:.1f}",
          f"{r['pipelined_us']:.1f} ({r['pipelined_us'] / r['floor_us']:.2f})",
          f"{r['kernel_sum_us']:.1f} ({r['num_kernels']})", f"{entry['peer_us']:.1f}",
          f"**{ratio}**" if entry["ratio"] < 1 else ratio, split,
          f"{r['matched_ratio']:.3f} / {r['rel_l2']:.1e}"]


def summary_lines(result: dict) -> list[str]:
  n = len(result["rows"])
  slower = ", ".join(f"{scenario} T={t} ({ratio:.3f})" for scenario, t, ratio in result["slower"]) or "none"
  return [f"pipelined geomean over the uniform rows: {result['geomean_pipelined']:.3f}x the floor "
          f"(kernel sum {result['geomean_kernel_sum']:.3f}x; the peer's GEMM path {result['geomean_peer']:.3f}x)",
          f"faster than the peer's GEMM path at {len(result['faster'])} of {n} rows; slower: {slower}"]


def main(argv):
  del argv
  result = compare(timed_rows(_PROJECT.value), tables.read_jsonl(_PEER.value))
  print(tables.markdown_table(HEADER, (table_cells(entry) for entry in result["rows"])))
  print()
  print("\n".join(summary_lines(result)))


if __name__ == "__main__":
  app.run(main)
