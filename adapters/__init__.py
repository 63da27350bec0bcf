"""PyTorch adapters for regroup, installed as ``regroup.adapters``.

The core (``regroup``) never imports this package; it imports the core. Import the
submodule for a framework: ``from regroup.adapters.torch import regroup_model``.
"""
