"""Hostile models for the PyTorch adapters (issue 15, model side).

Tied and memory-sharing parameters must never be permuted inconsistently by a fold; two
names for one tensor are refused; a failure part-way through changes nothing; weights a
mask cannot cover (weight_norm) and meta-device models are refused with their names.
Every exactness check compares the regrouped model with the same masks applied to an
unpermuted twin (fp32, atol 1e-5), and every check of "nothing changed" compares the
state dict bit for bit together with the module structure.
"""
import dataclasses
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.ao.pruning.sparsifier.utils import FakeSparsity  # noqa: E402
from torch.nn.utils import parametrize, prune  # noqa: E402
from torch.nn.utils.parametrizations import weight_norm  # noqa: E402

from regroup import RegroupError  # noqa: E402
from regroup.adapters.torch import (apply_result, layer_masks,  # noqa: E402
                                    load_block_sparse, regroup_model, to_block_sparse,
                                    write_mask)
from regroup.adapters.torch import _journal  # noqa: E402
from regroup.adapters.torch import masking as masking_mod  # noqa: E402
from regroup.adapters.torch import plan as plan_mod  # noqa: E402
from tests.torch_zoo import pruned  # noqa: E402

ATOL = 1e-5


# -- models ------------------------------------------------------------------------------
class Chain(nn.Module):
    """a -> b -> c -> d (64, 64, 64, 48, 32): three hidden dimensions."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.c, self.d = nn.Linear(64, 48), nn.Linear(48, 32)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.d(torch.relu(self.c(h)))


class Tied(Chain):
    """Chain with ``b.weight = a.weight``: a's rows and b's columns share one order only
    if the tensor is permuted both ways, which no fold can do."""

    def __init__(self):
        super().__init__()
        self.b.weight = self.a.weight


class SharedMemory(Chain):
    """b's weight is another Parameter over a's memory (``nn.Parameter(a.weight.data)``)."""

    def __init__(self):
        super().__init__()
        self.b.weight = nn.Parameter(self.a.weight.detach())


class TwiceCalled(nn.Module):
    """One Linear reached by two names (``self.b = self.a``) and called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = self.a
        self.c, self.d = nn.Linear(64, 48), nn.Linear(48, 32)

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.d(torch.relu(self.c(h)))


class TiedHead(nn.Module):
    """A language-model head tied to the embedding (``head.weight = emb.weight``)."""

    def __init__(self, vocab=48, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.f, self.g = nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.relu(self.f(self.emb(tokens)))
        return self.head(torch.relu(self.g(h)))


class SharedProducers(nn.Module):
    """Two producers of one hidden dimension share their weight (own biases): one order
    serves both, and the shared tensor must be permuted once."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(40, 64), nn.Linear(40, 64)
        self.b.weight = self.a.weight
        self.c, self.d = nn.Linear(64, 48), nn.Linear(48, 32)

    def forward(self, x):
        h = torch.relu(self.a(x) + self.b(2 * x))
        return self.d(torch.relu(self.c(h)))


class DirectRead(nn.Module):
    """The forward reads ``fc.weight`` itself besides calling ``fc``."""

    def __init__(self):
        super().__init__()
        self.fc, self.g, self.h = nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 32)

    def forward(self, x):
        side = nn.functional.linear(x, self.fc.weight)
        y = self.g(torch.relu(self.fc(x)))
        return self.h(torch.relu(y)) + side[..., :32]


def _layers(model):
    return [m for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]


def _prune(model, source="prune", amount=0.75):
    """Magnitude-prune every Linear of ``model`` through ``source`` (each module once,
    shared tensors included)."""
    for m in _layers(model):
        w = m.weight.detach()
        keep = (w.abs() > w.abs().flatten().kthvalue(int(amount * w.numel())).values)
        if source == "prune":
            prune.custom_from_mask(m, "weight", keep)
        elif source == "ao":
            parametrize.register_parametrization(m, "weight", FakeSparsity(keep.float()))
        else:
            with torch.no_grad():
                m.weight.mul_(keep)
    return model


def make(cls, source="prune", seed=0):
    torch.manual_seed(seed)
    return _prune(cls().eval(), source)


def _input(model):
    g = torch.Generator().manual_seed(1)
    if isinstance(model, TiedHead):
        return torch.randint(0, 48, (4, 5), generator=g)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    # Large enough that the output moves well above ATOL through four sparse layers.
    return 10 * torch.randn(6, first.in_features, generator=g)


def _masked_twin(cls, plan, source="prune", prepare=None):
    """A fresh model built like the planned one, with the plan's masks, never permuted."""
    ref = make(cls, source)
    if prepare is not None:
        prepare(ref)
    for name, r in plan.layers.items():
        write_mask(ref.get_submodule(name.rpartition(".")[0]), "weight", r.mask)
    return ref


def _check_exact(model, plan, cls, source="prune", prepare=None):
    ref = _masked_twin(cls, plan, source, prepare)
    x = _input(model)
    assert all(r.mask.any() for r in plan.layers.values())
    with torch.no_grad():
        expected = ref(x)
        # The output depends on the input through every layer: a wrong order shows.
        assert (expected[0] - expected[1]).abs().max() > 0.01
        torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)
        for backend in ("dense", "bsr"):
            sparse = make(cls, source)
            if prepare is not None:
                prepare(sparse)
            plan.apply(sparse)
            to_block_sparse(sparse, plan, backend=backend)
            torch.testing.assert_close(sparse(x), expected, rtol=0, atol=ATOL)


def _regroup(model, **kw):
    kw = {"block": 16 if hasattr(model, "layers") else 8, "method": "sort", **kw}
    return regroup_model(model, example_inputs=(_input(model),), **kw)


def _folded(plan):
    return [sorted(f.producers) for f in plan.folds]


# -- snapshots ---------------------------------------------------------------------------
def _snapshot(model):
    """Everything a failed call must leave as it was: every state-dict tensor bit for bit
    (dtype, shape, bytes), and per module path its class, training flag, parameter
    objects (ties included), buffer names, plain tensor attributes, parametrizations and
    forward hooks."""
    tensors = {k: (v.dtype, tuple(v.shape),
                   v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
               for k, v in model.state_dict(keep_vars=True).items()}
    return tensors, _structure_only(model)


def _structure_only(model):
    return {name: (type(m), m.training, tuple((k, id(p)) for k, p in m._parameters.items()),
                   tuple(m._buffers), tuple(sorted(k for k, v in vars(m).items()
                                                   if isinstance(v, torch.Tensor))),
                   tuple(m._forward_pre_hooks.items()), tuple(m._forward_hooks.items()),
                   parametrize.is_parametrized(m))
            for name, m in model.named_modules(remove_duplicate=False)}


def _assert_unchanged(model, before):
    tensors, structure = _snapshot(model)
    assert structure == before[1]
    assert tensors.keys() == before[0].keys()
    changed = [k for k in tensors if tensors[k] != before[0][k]]
    assert not changed, f"changed tensors: {changed}"


# -- 1. tied and shared parameters ------------------------------------------------------
@pytest.mark.parametrize("source", ["prune", "zeros", "ao"])
def test_tied_weights_are_left_unfolded_with_the_reason(source):
    model = make(Tied, source)
    assert masking_mod.unmasked(model.a) is masking_mod.unmasked(model.b)
    plan = _regroup(model)
    # a -> b and b -> c touch the tied tensor with different orders: not folded;
    # c -> d folds (the test would not see a missing fold otherwise).
    assert _folded(plan) == [["c"]]
    assert "tied parameters" in plan.sides["a.weight"]["why_rows"]
    assert "tied parameters" in plan.sides["b.weight"]["why_rows"]
    assert "tied parameters" in plan.sides["b.weight"]["why_cols"]
    assert plan.sides["c.weight"]["rows"] == "fold"
    _check_exact(model, plan, Tied, source)
    assert masking_mod.unmasked(model.a) is masking_mod.unmasked(model.b)   # still tied


def test_embedding_tied_to_the_head_is_not_permuted():
    model = make(TiedHead)
    plan = _regroup(model)
    assert _folded(plan) == [["f"]]
    assert "tied parameters" in plan.sides["head.weight"]["why_cols"]
    assert "'emb.weight'" in plan.sides["head.weight"]["why_cols"]
    _check_exact(model, plan, TiedHead)


def test_tied_producers_share_one_order_and_are_permuted_once():
    model = make(SharedProducers)
    plan = _regroup(model)
    assert _folded(plan)[0] == ["a", "b"]         # one order for both, folded
    assert plan.sides["a.weight"]["rows"] == plan.sides["b.weight"]["rows"] == "fold"
    assert masking_mod.unmasked(model.a) is masking_mod.unmasked(model.b)
    _check_exact(model, plan, SharedProducers)


def test_tied_linear_used_twice_in_a_forward():
    model = make(TwiceCalled)
    plan = _regroup(model)
    assert "b.weight" not in plan.layers           # one module, one layer
    assert "called more than once" in plan.sides["a.weight"]["why_rows"]
    assert _folded(plan) == [["c"]]
    _check_exact(model, plan, TwiceCalled)


def test_parameters_sharing_memory_are_not_folded():
    model = make(SharedMemory)
    assert model.a.weight_orig is not model.b.weight_orig
    plan = _regroup(model)
    assert "shares memory with" in plan.sides["a.weight"]["why_rows"]
    assert _folded(plan) == [["c"]]
    _check_exact(model, plan, SharedMemory)


def test_a_weight_read_directly_by_the_forward_is_not_folded():
    model = make(DirectRead)
    plan = _regroup(model)
    assert "read directly" in plan.sides["fc.weight"]["why_rows"]
    assert _folded(plan) == [["g"]]
    assert "read directly" in plan.dense["fc.weight"]      # to_block_sparse keeps it
    _check_exact(model, plan, DirectRead)


def test_a_plan_cannot_fold_a_tied_instance():
    """A plan made on the untied architecture, applied to a tied instance: refused with
    both names before anything changes."""
    plan = _regroup(make(Chain))
    assert ["a"] in _folded(plan)
    model = make(Tied)
    before = _snapshot(model)
    with pytest.raises(RegroupError, match=r"'a\.weight_orig' and 'b\.weight_orig' are one "
                                           r"tensor \(tied parameters\)"):
        plan.apply(model)
    _assert_unchanged(model, before)


# -- 2. two names for one tensor ---------------------------------------------------------
@pytest.mark.parametrize("second", ["fc.parametrizations.weight.original", "fc.weight_orig"])
def test_apply_result_refuses_two_names_for_one_tensor(second):
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(x)

    model = make(One, "ao")
    plan = _regroup(make(One, "ao"), mode="runtime")
    r = plan.layers["fc.weight"]
    other = dataclasses.replace(r, name=second, mask=~r.mask)
    before = _snapshot(model)
    with pytest.raises(RegroupError, match=rf"'fc\.weight' and '{second}' are one tensor"):
        apply_result(model, {"fc.weight": r, second: other})
    _assert_unchanged(model, before)
    # the parametrization's own name is understood as fc.weight (not its ParametrizationList)
    apply_result(model, {"fc.parametrizations.weight.original": r})
    assert torch.equal(model.fc.parametrizations.weight[0].mask.bool(), torch.from_numpy(r.mask))


def test_a_plan_naming_one_module_twice_is_refused():
    """A module reached by two paths (``self.b = self.a``) and a plan with a layer under
    each name: one mask would replace the other."""
    model = make(TwiceCalled)
    plan = _regroup(make(TwiceCalled), mode="runtime")
    plan.layers["b.weight"] = dataclasses.replace(plan.layers["a.weight"], name="b.weight")
    before = _snapshot(model)
    with pytest.raises(RegroupError, match=r"'a\.weight' and 'b\.weight' of the plan are one "
                                           "tensor"):
        plan.apply(model)
    _assert_unchanged(model, before)


def test_rewind_with_two_tensors_for_one_layer_is_refused():
    model = make(Chain, "ao")
    plan = _regroup(make(Chain, "ao"))
    w = model.c.parametrizations.weight.original.detach()
    rewind = {"c.weight": w.clone(), "c.parametrizations.weight.original": w + 1}
    before = _snapshot(model)
    with pytest.raises(RegroupError, match=r"both 'c\.weight' and "
                                           r"'c\.parametrizations\.weight\.original'"):
        plan.apply(model, rewind=rewind)
    _assert_unchanged(model, before)


def test_tied_layers_with_different_rewind_values_are_refused():
    model = make(Tied)
    plan = _regroup(make(Tied))
    w = model.a.weight_orig.detach()
    before = _snapshot(model)
    with pytest.raises(RegroupError, match=r"'a\.weight' and 'b\.weight' share one weight"):
        plan.apply(model, rewind={"a.weight": w.clone(), "b.weight": w + 1})
    _assert_unchanged(model, before)


# -- 3. all or nothing -------------------------------------------------------------------
class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def _fail_on_call(monkeypatch, owner, attr, n, exc=RuntimeError):
    """Make ``owner.attr`` raise ``exc`` on its ``n``-th call (calls before run)."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc(f"injected failure in {attr}")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, attr, wrapper)
    return calls


def _tamper(case, plan, model, monkeypatch):
    """Break the plan or the model for a LATER layer or fold; the expected error."""
    last = list(plan.layers)[-1]
    if case == "order-not-a-permutation":
        plan.folds[-1].perm = plan.folds[-1].perm.copy()
        plan.folds[-1].perm[0] = plan.folds[-1].perm[1]
        return RegroupError, "not a permutation"
    if case == "order-too-short":
        plan.folds[-1].perm = plan.folds[-1].perm[:-1]
        return RegroupError, "not a permutation|features"
    if case == "mask-shape":
        r = plan.layers[last]
        plan.layers[last] = dataclasses.replace(r, mask=r.mask[:-1])
        return RegroupError, "mask has shape"
    if case == "fold-member-kind":
        plan.folds[-1].norms.append("layers.0")           # a Linear posing as a norm
        return RegroupError, "not a module a fold permutes"
    if case == "custom-parametrization":
        prune.remove(model.head, "weight")
        parametrize.register_parametrization(model.head, "weight", _Scale())
        return RegroupError, r"'head\.weight'.*_Scale"
    if case == "weight-norm":
        prune.remove(model.head, "weight")
        weight_norm(model.head)
        return RegroupError, r"'head\.weight'.*weight_norm"
    if case == "write-fails":
        _fail_on_call(monkeypatch, masking_mod, "write_mask", len(plan.layers))
        return RuntimeError, "injected"
    if case == "permute-fails":
        _fail_on_call(monkeypatch, _journal.Journal, "permute", 5)
        return RuntimeError, "injected"
    if case == "interrupted":
        _fail_on_call(monkeypatch, _journal.Journal, "permute", 3, KeyboardInterrupt)
        return KeyboardInterrupt, "injected"
    raise AssertionError(case)


CASES = ["order-not-a-permutation", "order-too-short", "mask-shape", "fold-member-kind",
         "custom-parametrization", "weight-norm", "write-fails", "permute-fails",
         "interrupted"]


@pytest.mark.parametrize("case", CASES)
def test_plan_apply_is_all_or_nothing(case, monkeypatch):
    plan = _regroup(pruned("mlp")[0])
    assert len(plan.folds) == 2 and list(plan.layers) == ["layers.0.weight", "layers.1.weight"]
    model, x = pruned("mlp")
    exc, match = _tamper(case, plan, model, monkeypatch)
    before = _snapshot(model)
    with torch.no_grad():
        out = model(x)
    with pytest.raises(exc, match=match):
        plan.apply(model)
    _assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), out)


@pytest.mark.parametrize("case", ["order-not-a-permutation", "fold-member-kind",
                                  "permute-fails", "interrupted"])
def test_plan_fold_is_all_or_nothing(case, monkeypatch):
    plan = _regroup(pruned("mlp")[0])
    model, _ = pruned("mlp")
    plan.apply(model, permute=False)
    exc, match = _tamper(case, plan, model, monkeypatch)
    before = _snapshot(model)
    with pytest.raises(exc, match=match):
        plan.fold(model)
    _assert_unchanged(model, before)


def test_regroup_model_failing_on_its_last_layer_changes_nothing(monkeypatch):
    model, x = pruned("mlp")
    before = _snapshot(model)
    _fail_on_call(monkeypatch, masking_mod, "write_mask", 2)       # the second, last layer
    with pytest.raises(RuntimeError, match="injected"):
        _regroup(model)
    _assert_unchanged(model, before)


def test_apply_result_failing_on_its_last_layer_changes_nothing(monkeypatch):
    plan = _regroup(pruned("mlp")[0], mode="runtime")
    model, _ = pruned("mlp")
    before = _snapshot(model)
    _fail_on_call(monkeypatch, masking_mod, "write_mask", len(plan.layers))
    with pytest.raises(RuntimeError, match="injected"):
        apply_result(model, plan.layers)
    _assert_unchanged(model, before)


def test_zeros_source_rollback_restores_plain_parameters(monkeypatch):
    """A plain weight gets prune's reparametrization (weight_orig, weight_mask, a hook);
    a failure on a later layer removes it again, the Parameter objects unchanged."""
    plan = _regroup(make(Chain, "zeros"))
    model = make(Chain, "zeros")
    before = _snapshot(model)
    _fail_on_call(monkeypatch, _journal.Journal, "permute", 4)
    with pytest.raises(RuntimeError, match="injected"):
        plan.apply(model)
    _assert_unchanged(model, before)
    assert not any(prune.is_pruned(m) for m in _layers(model))


def test_to_block_sparse_failing_on_a_later_layer_swaps_nothing(monkeypatch):
    model, _ = pruned("mlp")
    plan = _regroup(model)
    before = _snapshot(model)
    _fail_on_call(monkeypatch, plan_mod.BlockSparseLinear, "__init__", len(plan.layers))
    with pytest.raises(RuntimeError, match="injected"):
        to_block_sparse(model, plan)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("when", ["before-copy", "after-copy", "interrupted"])
def test_load_block_sparse_failing_part_way_changes_nothing(monkeypatch, when):
    """Every check passes; loading the values then fails (before or after copying them):
    the dense model keeps its modules, masks and values."""
    model, x = pruned("mlp")
    plan = _regroup(model)
    to_block_sparse(model, plan, backend="dense")
    state = model.state_dict()
    fresh, _ = pruned("mlp", seed=1)
    before = _snapshot(fresh)
    real = nn.Module.load_state_dict

    def failing(self, *args, **kwargs):
        if self is fresh and when != "before-copy":
            real(self, *args, **kwargs)
        if self is fresh:
            raise (KeyboardInterrupt if when == "interrupted" else RuntimeError)("injected")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(nn.Module, "load_state_dict", failing)
    with pytest.raises((RuntimeError, KeyboardInterrupt), match="injected"):
        load_block_sparse(fresh, state, backend="dense")
    _assert_unchanged(fresh, before)
    monkeypatch.setattr(nn.Module, "load_state_dict", real)
    load_block_sparse(fresh, state, backend="dense")       # and it still loads after
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=ATOL)


def test_regroup_model_keeps_every_training_flag():
    model, _ = pruned("mlp")
    model.train()
    model.norm.eval()                          # a frozen BatchNorm in a training model
    flags = [m.training for m in model.modules()]
    regroup_model(model, block=16, method="sort", example_inputs=(torch.randn(6, 40),),
                  calibration=[torch.randn(6, 40)])
    assert [m.training for m in model.modules()] == flags


# -- 4. weight_norm and meta-device models -----------------------------------------------
def _prune_but(model, skip):
    """Magnitude-prune every Linear but ``skip`` (a layer under weight_norm)."""
    for name, m in model.named_modules():
        if name and name != skip and isinstance(m, nn.Linear):
            w = m.weight.detach()
            prune.custom_from_mask(m, "weight", w.abs() > w.abs().flatten().kthvalue(
                int(0.75 * w.numel())).values)


def _weight_norm_b(model):
    weight_norm(model.b)


def _old_weight_norm_b(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(model.b)


@pytest.mark.parametrize("prepare, what", [(_weight_norm_b, "weight_norm keeps"),
                                           (_old_weight_norm_b, "weight_g and weight_v")])
def test_weight_norm_layer_is_skipped_and_not_permuted(prepare, what):
    """A weight computed by weight_norm has no mask to set: the layer is skipped with the
    reason, the folds next to it stay unfolded, and the rest is regrouped exactly."""
    torch.manual_seed(0)
    model = Chain().eval()
    prepare(model)
    _prune_but(model, "b")
    plan = _regroup(model)
    assert "b.weight" in plan.skipped and what in plan.skipped["b.weight"]
    assert "'b.weight'" in plan.sides["a.weight"]["why_rows"]
    assert "'b.weight'" in plan.sides["c.weight"]["why_cols"]
    assert _folded(plan) == [["c"]]
    torch.manual_seed(0)
    ref = Chain().eval()
    prepare(ref)
    _prune_but(ref, "b")
    for name, r in plan.layers.items():
        write_mask(ref.get_submodule(name.rpartition(".")[0]), "weight", r.mask)
    x = _input(model)
    with torch.no_grad():
        expected = ref(x)
        assert (expected[0] - expected[1]).abs().max() > 0.01
        torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)
    with pytest.raises(RegroupError, match=r"layer 'b\.weight'.*" + what):
        layer_masks(model)


def test_plan_onto_a_weight_norm_layer_is_refused_by_name():
    plan = _regroup(make(Chain))
    torch.manual_seed(0)
    model = Chain().eval()
    weight_norm(model.c)
    _prune_but(model, "c")
    before = _snapshot(model)
    with pytest.raises(RegroupError, match=r"layer 'c\.weight'.*weight_norm"):
        plan.apply(model)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("where", ["all", "d"])
def test_meta_device_models_are_refused_by_parameter_name(where):
    plan = _regroup(make(Chain))
    model = make(Chain)
    if where == "all":
        model.to("meta")
        name = r"'a\.bias'"
    else:
        model.d.to("meta")
        name = r"'d\.bias'"
    structure = _structure_only(model)
    for call in (lambda: _regroup(model), lambda: layer_masks(model),
                 lambda: plan.apply(model), lambda: plan.fold(model),
                 lambda: apply_result(model, plan.layers)):
        with pytest.raises(RegroupError, match=name + r" is on the meta device"):
            call()
    assert _structure_only(model) == structure


def test_a_fold_never_permutes_parametrized_norm_parameters():
    """A parametrized BatchNorm weight (a computed tensor) would be permuted as a copy,
    not its stored original: the dimension is left unfolded with the reason."""
    model, x = pruned("mlp")
    parametrize.register_parametrization(model.norm, "weight", _Scale())
    plan = _regroup(model)
    assert "'norm.weight'" in plan.sides["layers.0.weight"]["why_rows"]
    assert all("norm" not in f.norms for f in plan.folds)
    ref, _ = pruned("mlp")
    parametrize.register_parametrization(ref.norm, "weight", _Scale())
    for name, r in plan.layers.items():
        write_mask(ref.get_submodule(name.rpartition(".")[0]), "weight", r.mask)
    with torch.no_grad():
        expected = ref(x)
        assert (expected[0] - expected[1]).abs().max() > 0.01
        torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)


def test_folding_still_happens_on_ordinary_models():
    """The checks above must not turn folding off: the zoo MLP folds both dimensions."""
    model, x = pruned("mlp")
    plan = _regroup(model)
    assert _folded(plan) == [["layers.0"], ["layers.1"]]
    assert np.all([s["rows"] == "fold" for s in plan.sides.values()])
