"""Rows of cells as aligned text: the one table printer of the CLI, the demo and the
benchmarks. Columns are two spaces apart, each as wide as its widest cell; lines
carry no trailing blanks."""
from __future__ import annotations

from typing import Collection, Iterable, Sequence


def lines(head: Sequence[object], rows: Iterable[Sequence[object]], *, left: Collection[int] | None = None,
          rule: bool = True) -> list[str]:
    """The table's lines: `head`, a rule of dashes under it (unless rule=False), then
    `rows`. Cells are str()'d. Columns in `left` (indices; negative ones count from
    the end) are left-aligned, the others right-aligned; left=None: all left."""
    table = [[str(c) for c in head], *([str(c) for c in row] for row in rows)]
    n = len(table[0])
    widths = [max(len(line[i]) for line in table) for i in range(n)]
    if rule:
        table.insert(1, ["-" * w for w in widths])
    on_left = [left is None or i in left or i - n in left for i in range(n)]
    return ["  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(line, widths, on_left)).rstrip()
            for line in table]


def render(head: Sequence[object], rows: Iterable[Sequence[object]], *, left: Collection[int] | None = None,
           rule: bool = True) -> str:
    """lines(), joined by newlines (no newline at the end)."""
    return "\n".join(lines(head, rows, left=left, rule=rule))
