"""The experiments' rows: read back from their JSONL files, and written as Markdown tables."""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Sequence


def read_jsonl(path) -> list[dict]:
  """Every record of a JSONL file (blank lines skipped)."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path, records: Iterable[dict]) -> None:
  """`records` as a JSONL file, one JSON object a line (the file replaced)."""
  pathlib.Path(path).write_text("".join(json.dumps(record) + "\n" for record in records))


def benchmark_rows(paths) -> tuple[list[dict], list[dict]]:
  """(headers, rows that ran ok) of JSONL files written by benchmark.py."""
  records = [record for path in paths for record in read_jsonl(path)]
  headers = [r for r in records if r.get("record") == "header"]
  rows = [r for r in records if r.get("record") == "row" and r.get("status") == "ok" and r.get("time_us")]
  return headers, rows


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  """A Markdown table: `header` cells, then one line per row of cells."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  return "\n".join(lines)


# Our kernels by name: routing (route, plan, schedule), GEMM1 (every launch of it: at T=14-80 the idle one
# too), GEMM2, the combine, and the rest (the Mosaic path's row gather, XLA's small ops around the GEMMs).
ROUTING_KERNELS = frozenset({"moe_route", "moe_layout_place", "moe_route_layout_place", "moe_layout",
                             "moe_layout_sums", "moe_place"})
KERNEL_GROUPS = ("routing", "gemm1", "gemm2", "combine", "other")


def kernel_group(name: str) -> str:
  """Which of KERNEL_GROUPS a kernel of a benchmark row's `kernels` belongs to."""
  if name in ROUTING_KERNELS:
    return "routing"
  if "gemm1" in name:
    return "gemm1"
  if "gemm2" in name:
    return "gemm2"
  return "combine" if "combine" in name else "other"


def kernel_groups(kernels) -> dict[str, float]:
  """[(name, us), ...] -> us per KERNEL_GROUPS entry."""
  groups = dict.fromkeys(KERNEL_GROUPS, 0.0)
  for name, us in kernels:
    groups[kernel_group(name)] += us
  return groups
