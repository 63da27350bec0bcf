"""PyTorch adapters for regroup, installed as ``regroup.adapters``.

The core (``regroup``) never imports this package; it imports the core.

Index
-----
regroup.adapters.torch.apply_result -- apply stored refilled block masks to a model's
                                       layers through torch.nn.utils.prune
"""
