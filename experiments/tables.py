"""Markdown tables of the experiments' rows (the scripts that print one header and one line per row)."""

from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  """A Markdown table: `header` cells, then one line per row of cells."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  return "\n".join(lines)
