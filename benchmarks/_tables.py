"""Output helpers shared by the benchmark scripts."""
from __future__ import annotations

import csv
import os


def write_outputs(out_dir: str, stem: str, rows: list[dict], markdown: list[str]) -> None:
    """``<stem>.csv`` (one row per dict) and ``<stem>.md`` (the given lines) in
    ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(markdown) + "\n")
