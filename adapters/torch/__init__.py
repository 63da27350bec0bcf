"""PyTorch adapters: apply regrouped block masks to models and run them block-sparse.

Every entry point that regroups takes ``options=regroup.RegroupOptions(...)``, and
keyword arguments naming its fields as a convenience (``block=16, method="metis"``);
``layers`` is always a glob (or list of globs) over weight names (``"fc1.weight"``,
``"encoder.*"``).

Index
-----
regroup_model      -- plan every pruned Linear/Conv2d/in_proj_weight, refill block masks,
                      fold permutations
Plan               -- the per-layer layouts and folds; save / load / apply / fold / report
prepare_for_load   -- register the fold marker on a fresh model before loading a folded one
to_block_sparse    -- swap planned layers for block-sparse modules (runtime permutations)
save_block_sparse  -- write a block-sparse model (values + layouts) as .safetensors
load_block_sparse  -- rebuild a saved block-sparse model in a fresh dense one, without the plan
set_backend        -- set the execution path of every block-sparse module (before export)
DispatchRecord     -- what backend "auto" measured for one module and input class
BlockSparseLinear  -- Linear on kept blocks: torch BSR (CPU/CUDA) or dense, measured
BlockSparseConv2d  -- the same for Conv2d, through im2col
BlockSparseMultiheadAttention -- MultiheadAttention with block-sparse in/out projections
NMLinear           -- Linear with an N:M (2:4) weight: torch's sparse tensor cores on CUDA
hidden_dims        -- the hidden dimensions of a model, and where folding is exact
layer_masks        -- the masks of a live model (prune, ao.pruning, or zeros)
write_mask / read_mask -- set or read one tensor's mask, whichever mechanism holds it
apply_result       -- apply a `regroup run` result file to a live model
regroup_unstructured / RegroupBlocks -- torch.nn.utils.prune method (like l1_unstructured)
RegroupSparsifier  -- torch.ao.pruning sparsifier that regroups on every step()
RegroupDST         -- dynamic sparse training: RigL-style drop and grow of block units
imp_regroup        -- the IMP-Regroup loop: train, prune, regroup, rewind; callbacks
input_scales       -- input feature norms on calibration data (regroup_model's calibration=)
recover            -- distil the dense teacher into a regrouped model, block masks fixed
teacher_outputs    -- the teacher's outputs on a fixed set of batches, for recover(targets=)
"""
from ._apply import apply_result
from .calibration import call_model, input_scales
from .dst import RegroupDST
from .graph import DimAnalysis, HiddenDim, hidden_dims
from .hooks import (RegroupBlocks, RegroupSparsifier, block_layout, imp_regroup,
                    magnitude_mask, regroup_unstructured)
from .masking import read_mask, write_mask
from .plan import (FOLD_MARKER, Fold, Plan, fold_marker, layer_masks, prepare_for_load,
                   regroup_model, to_block_sparse)
from .persist import load_block_sparse, save_block_sparse
from .recover import Recovery, recover, teacher_outputs
from .semi_structured import NMLinear
from .sparse import (BlockSparseConv2d, BlockSparseLinear, BlockSparseMultiheadAttention,
                     DispatchRecord, set_backend)

__all__ = ["regroup_model", "Plan", "Fold", "to_block_sparse", "BlockSparseLinear",
           "BlockSparseConv2d", "BlockSparseMultiheadAttention", "hidden_dims", "HiddenDim",
           "DimAnalysis", "layer_masks", "apply_result", "RegroupBlocks",
           "regroup_unstructured", "block_layout", "RegroupSparsifier", "imp_regroup",
           "magnitude_mask", "write_mask", "read_mask", "prepare_for_load", "fold_marker",
           "FOLD_MARKER", "recover", "Recovery", "teacher_outputs", "input_scales", "call_model",
           "save_block_sparse", "load_block_sparse", "set_backend", "DispatchRecord",
           "NMLinear", "RegroupDST"]
