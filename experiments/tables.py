"""The experiments' rows: read back from their JSONL files, and written as Markdown tables."""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Sequence


def read_jsonl(path) -> list[dict]:
  """Every record of a JSONL file (blank lines skipped)."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


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
