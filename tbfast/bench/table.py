"""Plain-text and markdown tables for the benchmark reports (no other bench module imported)."""
from __future__ import annotations

__all__ = ["format_table"]


def format_table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """``rows`` under ``headers``: a markdown table, or left-aligned columns for a terminal."""
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])
