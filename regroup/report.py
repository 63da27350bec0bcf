"""Human-readable tables and machine-readable reports (JSON, CSV, Markdown)."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._atomic import atomic_write

__all__ = ["format_table", "markdown_table", "write_json", "write_csv", "report_row",
           "report_total"]


def report_row(layer: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """One layer of the JSON report, from its result-file record
    (:func:`regroup.result.layer_record`) and its wall-clock seconds."""
    shape = list(layer["shape"])
    return {"name": layer["name"], "shape": shape,
            "matrix_shape": [shape[0], int(np.prod(shape[1:]))],
            "block": list(layer["block_shape"]), "format": layer["format"],
            **({"nm": layer["nm"]} if "nm" in layer else {}),     # N:M layers only
            "method": layer["method"], "params": layer["params"], "seed": layer["seed"],
            **layer["metrics"], "seconds": seconds}


def report_total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's summary: nnz-weighted retained (and identity's), summed seconds."""
    nnz = sum(r["nnz"] for r in rows)
    return {"layers": len(rows), "nnz": nnz,
            "retained": sum(r["retained"] * r["nnz"] for r in rows) / nnz if nnz else None,
            "retained_identity": (sum(r["retained_identity"] * r["nnz"] for r in rows) / nnz
                                  if nnz else None),
            "seconds": sum(r["seconds"] or 0.0 for r in rows)}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return "x".join(map(str, v))
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Fixed-width text table (numbers right-aligned)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
               for c in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(vals, widths, numeric)).rstrip()
    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """GitHub-flavoured Markdown table."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_json(obj: Any, path) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_csv(rows: Sequence[dict], columns: Sequence[str], path) -> None:
    """Write rows as CSV, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    with atomic_write(path) as f:
        f.write(buf.getvalue())
