"""regroup: turn the unstructured sparsity of pruned weights into dense blocks.

A weight's sparsity pattern is regrouped by row (and column) permutations so that surviving
weights gather into ``br x bc`` blocks; the best blocks are kept (and refilled), the rest
dropped. ``import regroup`` never imports torch.

Index
-----
RegroupOptions    -- every option of a run, validated once (block, method, budget, ...)
regroup_pattern   -- regroup one layer (a Pattern) into a scored block layout
regroup_budgets   -- the same at several budgets, each partitioner run once
regroup_file      -- regroup every layer of a mask or checkpoint, results in memory
regroup_checkpoint -- the same, streamed to a result file (resumable, --jobs, dask)
from_array        -- Pattern from a dense weight and/or mask (2-D or 4-D)
from_sparse       -- Pattern from a scipy sparse matrix
read_patterns     -- the usable layers of a file, and the skipped ones with reasons
load_result       -- read a result file: layer name -> LayerResult
save_result       -- write layer results to a result file
Budget            -- iso-density, density, block count or retained-fraction budget
check_layout      -- verify a mask is a union of whole blocks of its layout
column_net        -- the column-net hypergraph of a pattern (km1, cut, .hgr export)
list_partitioners / available_partitioners -- registered partitioner names
"""
from __future__ import annotations

from .validation import FormatError, PartitionerError, RegroupError
from .blocks import Budget, check_layout
from .engine import regroup_budgets, regroup_pattern
from .hypergraph import column_net, cut, km1, write_hgr
from .io import read_patterns
from .options import RegroupOptions
from .partitioners import available_partitioners, list_partitioners
from .pattern import Pattern, from_array, from_sparse
from .pipeline import Run, regroup_checkpoint, regroup_file
from .result import LayerResult, load_result, save_result

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "FormatError",
    "LayerResult",
    "PartitionerError",
    "Pattern",
    "RegroupError",
    "RegroupOptions",
    "Run",
    "available_partitioners",
    "check_layout",
    "column_net",
    "cut",
    "from_array",
    "from_sparse",
    "km1",
    "list_partitioners",
    "load_result",
    "read_patterns",
    "regroup_budgets",
    "regroup_checkpoint",
    "regroup_file",
    "regroup_pattern",
    "save_result",
    "write_hgr",
]
