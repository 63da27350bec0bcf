"""RegroupOptions: one record, one constraint table, one invalid-parameter test for every
entry point."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import regroup
from regroup import RegroupOptions, from_array, load_result, regroup_file, regroup_pattern
from regroup.blocks import Budget
from regroup.compare import compare
from regroup.options import CONSTRAINTS

EXAMPLE = Path(regroup.__file__).parent / "data" / "example.npz"


def _pattern():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 40)) * (rng.random((48, 40)) < 0.2)
    return from_array(w, name="fc.weight")


def _torch_model():
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 48), torch.nn.ReLU(),
                                torch.nn.Linear(48, 8))
    prune.l1_unstructured(model[0], "weight", amount=0.8)
    return model


def _regroup_model(**kw):
    from regroup.adapters.torch import regroup_model
    return regroup_model(_torch_model(), mode="runtime", **kw)


def _regroup_unstructured(**kw):
    from regroup.adapters.torch import regroup_unstructured
    return regroup_unstructured(_torch_model()[0], "weight", **kw)


def _regroup_blocks(**kw):
    from regroup.adapters.torch import RegroupBlocks
    return RegroupBlocks(**kw)


def _sparsifier(**kw):
    from regroup.adapters.torch import RegroupSparsifier
    return RegroupSparsifier(**kw)


def _imp(**kw):
    from regroup.adapters.torch import imp_regroup
    return imp_regroup(_torch_model(), lambda model, r: None, rounds=1, sparsity=0.5, **kw)


# Entry point -> (the caller name its errors give, a call taking option keywords).
ENTRY_POINTS = {
    "regroup_pattern": ("regroup_pattern", lambda tmp, **kw: regroup_pattern(_pattern(), **kw)),
    "regroup_file": ("regroup_file", lambda tmp, **kw: regroup_file(EXAMPLE, **kw)),
    "regroup_checkpoint": ("regroup_checkpoint", lambda tmp, **kw: regroup.regroup_checkpoint(
        EXAMPLE, tmp / "out.npz", **kw)),
    "compare": ("compare", lambda tmp, **kw: compare([EXAMPLE], ["sort"], **kw)),
    "regroup_model": ("regroup_model", lambda tmp, **kw: _regroup_model(**kw)),
    "regroup_unstructured": ("regroup_unstructured",
                             lambda tmp, **kw: _regroup_unstructured(**kw)),
    "RegroupBlocks": ("RegroupBlocks", lambda tmp, **kw: _regroup_blocks(**kw)),
    "RegroupSparsifier": ("RegroupSparsifier", lambda tmp, **kw: _sparsifier(**kw)),
    "imp_regroup": ("imp_regroup", lambda tmp, **kw: _imp(**kw)),
}
TORCH = {"regroup_model", "regroup_unstructured", "RegroupBlocks", "RegroupSparsifier",
         "imp_regroup"}
INVALID = [(name, bad) for name, c in CONSTRAINTS.items() for bad in c.invalid]


def _id(v):
    return repr(v)[:20]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("param,bad", INVALID, ids=[f"{n}={_id(v)}" for n, v in INVALID])
def test_every_entry_point_refuses_every_invalid_option(entry, param, bad, tmp_path):
    if entry in TORCH:
        pytest.importorskip("torch")
    caller, call = ENTRY_POINTS[entry]
    with pytest.raises((TypeError, ValueError),
                       match=rf"^The '{param}' parameter of {caller} must be .* Got .* "
                             "instead") as exc:
        call(tmp_path, **{param: bad})
    assert not isinstance(exc.value, regroup.RegroupError)   # a usage error, not data
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("param,bad", INVALID, ids=[f"{n}={_id(v)}" for n, v in INVALID])
def test_the_record_itself_refuses_every_invalid_option(param, bad):
    with pytest.raises((TypeError, ValueError),
                       match=rf"^The '{param}' parameter of RegroupOptions must be"):
        RegroupOptions(**{param: bad})


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_takes_options_and_names_unknown_keywords(entry, tmp_path):
    if entry in TORCH:
        pytest.importorskip("torch")
    caller, call = ENTRY_POINTS[entry]
    with pytest.raises(TypeError, match=rf"{caller} got unexpected keyword argument\(s\) "
                                        "'blok'; options are: block, format"):
        call(tmp_path, blok=16)
    with pytest.raises(TypeError, match=rf"'options' parameter of {caller} must be a "
                                        "RegroupOptions. Got dict instead"):
        call(tmp_path, options={"block": 16})


def test_options_and_keywords_build_the_same_run(tmp_path):
    opts = RegroupOptions(block="16x8", method="metis", params={"graph": "jaccard"},
                          seed=3, layers="fc*")
    assert opts.block == (16, 8) and opts.method == "metis:graph=jaccard"
    assert opts.params is None and opts.layers == ("fc*",) and opts.budget == Budget("iso")
    a = regroup_file(EXAMPLE, options=opts)
    b = regroup_file(EXAMPLE, block=(16, 8), method="metis:graph=jaccard", seed=3,
                     layers=["fc*"])
    a.save(tmp_path / "a.npz")
    b.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    # Keywords override the record's fields; the record is recorded in the result file.
    c = regroup_file(EXAMPLE, options=opts, seed=4)
    assert c.options == dataclasses.replace(opts, seed=4)
    meta = load_result(tmp_path / "a.npz").meta["options"]
    assert meta == opts.record() and RegroupOptions.from_record(meta) == opts
    assert [r.name for r in a.layers] == ["fc1.weight", "fc2.weight"]


def test_the_record_is_frozen_and_canonical():
    opts = RegroupOptions(method="metis:graph=shared")      # the default graph
    name, params = opts.partitioner
    assert opts.method == "metis" and name == "metis" and params["graph"] == "shared"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.seed = 3
    assert RegroupOptions(refine=None).refines and not RegroupOptions(method="sort").refines
    assert RegroupOptions(method="sort", refine=True).refines
    with pytest.raises(ValueError, match="'params' parameter of RegroupOptions must hold "
                                         "options of partitioner 'sort'"):
        RegroupOptions(method="sort", params={"graph": "jaccard"})
    with pytest.raises(ValueError, match="no layer matches 'x.*'; layers are: a, b"):
        RegroupOptions(layers="x*").select(["a", "b"], where="model.pt")
    assert RegroupOptions(layers=["b", "a"]).select(["a", "b", "c"]) == ["a", "b"]


def test_data_errors_are_value_errors_with_their_own_type():
    # Code that catches bad values catches bad data too; the CLI still tells them apart.
    assert issubclass(regroup.RegroupError, ValueError)
    assert issubclass(regroup.FormatError, regroup.RegroupError)
    assert issubclass(regroup.PartitionerError, regroup.RegroupError)
    with pytest.raises(regroup.RegroupError, match="fully dense"):
        regroup_pattern(from_array(np.ones((32, 32))), block=8)


def test_a_dense_weight_is_grouped_by_magnitude_when_asked():
    # Fine-tuning a pretrained (dense) model starts from its |w|: a count objective has
    # nothing to group, the magnitude objective does (planted blocks, rows and columns
    # shuffled, found again).
    rng = np.random.default_rng(0)
    W = np.kron(np.eye(4), np.ones((16, 16))) + 0.01 * rng.random((64, 64))
    W = W[rng.permutation(64)][:, rng.permutation(64)]
    with pytest.raises(regroup.RegroupError, match=r"fully dense .*objective='magnitude'"):
        regroup_pattern(from_array(W), block=16, budget="blocks=4")
    r = regroup_pattern(from_array(W), block=16, budget="blocks=4", objective="magnitude")
    assert r.metrics["kept_blocks"] == 4
    assert np.abs(W)[r.mask2d].sum() > 0.98 * np.kron(np.eye(4), np.ones((16, 16))).sum()
