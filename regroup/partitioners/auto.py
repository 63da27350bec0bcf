"""``auto``: a portfolio of strong, cheap partitioners; the best by retained mass wins.

The identity ordering is always a candidate, so auto never retains less than no
regrouping in the same format and budget. The portfolio never depends on what is
installed: every member's dependency is a hard requirement of regroup.
"""
from __future__ import annotations

from .registry import PartitionerSpec, register

PORTFOLIO = (
    "identity",
    "sort",
    "hierarchical",
    "hierarchical:linkage=complete",
    "metis",
    "metis:graph=jaccard",
)

register(PartitionerSpec(
    "auto", None, portfolio=PORTFOLIO,
    description="best of " + ", ".join(PORTFOLIO) + " by the objective"))
