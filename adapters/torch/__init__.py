"""PyTorch adapters: apply regrouped block masks to models and run them block-sparse.

Index
-----
regroup_model      -- plan every pruned Linear/Conv2d, refill block masks, fold permutations
Plan               -- the per-layer layouts and folds; save / load / apply / report
to_block_sparse    -- swap planned layers for block-sparse modules (runtime permutations)
BlockSparseLinear  -- Linear on kept blocks: torch BSR (CPU/CUDA) or dense, measured
BlockSparseConv2d  -- the same for Conv2d, through im2col
hidden_dims        -- the hidden dimensions of a model, and where folding is exact
layer_masks        -- the masks of a live model (prune, ao.pruning, or zeros)
apply_result       -- apply a `regroup run` result file through torch.nn.utils.prune
regroup_unstructured / RegroupBlocks -- torch.nn.utils.prune method (like l1_unstructured)
RegroupSparsifier  -- torch.ao.pruning sparsifier that regroups on every step()
imp_regroup        -- the IMP-Regroup loop: train, prune, regroup, rewind; callbacks
"""
from ._apply import apply_result
from .hooks import (RegroupBlocks, RegroupSparsifier, block_layout, imp_regroup,
                    magnitude_mask, regroup_unstructured)
from .graph import DimAnalysis, HiddenDim, hidden_dims
from .plan import Fold, Plan, layer_masks, regroup_model, to_block_sparse
from .sparse import BlockSparseConv2d, BlockSparseLinear

__all__ = ["regroup_model", "Plan", "Fold", "to_block_sparse", "BlockSparseLinear",
           "BlockSparseConv2d", "hidden_dims", "HiddenDim", "DimAnalysis", "layer_masks",
           "apply_result", "RegroupBlocks", "regroup_unstructured", "block_layout",
           "RegroupSparsifier", "imp_regroup", "magnitude_mask"]
