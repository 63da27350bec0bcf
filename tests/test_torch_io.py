"""PyTorch checkpoints: pruning conventions, nesting, and hostile pickles."""
import numpy as np
import pytest

from regroup import FormatError, read_patterns

torch = pytest.importorskip("torch")
prune = pytest.importorskip("torch.nn.utils.prune")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, 32), torch.nn.Conv2d(8, 16, 3))


def test_prune_layout_uses_mask_and_orig_magnitudes(tmp_path):
    model = _model()
    prune.l1_unstructured(model[0], "weight", amount=0.8)
    prune.random_unstructured(model[3], "weight", amount=0.5)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    pats, skipped = read_patterns(tmp_path / "ckpt.pt")
    by = {p.name: p for p in pats}
    assert set(by) == {"0.weight", "3.weight"}
    p = by["0.weight"]
    mask = model[0].weight_mask.numpy() != 0
    assert p.nnz == mask.sum() and p.has_weights
    np.testing.assert_allclose(p.matrix.toarray(), np.abs(model[0].weight_orig.detach().numpy())
                               * mask, rtol=1e-6)
    assert by["3.weight"].shape == (16, 8, 3, 3) and by["3.weight"].matrix.shape == (16, 72)
    reasons = dict(skipped)
    assert "fully dense" in reasons["2.weight"] and "1-D" in reasons["0.bias"]


def test_nested_state_dict_and_zero_weights(tmp_path):
    model = _model()
    prune.l1_unstructured(model[2], "weight", amount=0.9)
    prune.remove(model[2], "weight")                     # zeros baked into the weight
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "n.pth")
    pats, _ = read_patterns(tmp_path / "n.pth")
    assert [p.name for p in pats] == ["2.weight"]
    assert pats[0].nnz == int((model[2].weight != 0).sum())


def test_parametrized_weights_are_named_like_the_module(tmp_path):
    w = torch.randn(32, 16) * (torch.rand(32, 16) < 0.2)
    torch.save({"fc.parametrizations.weight.original": w, "fc.bias": torch.zeros(32)},
               tmp_path / "ao.pt")
    pats, _ = read_patterns(tmp_path / "ao.pt")
    assert pats[0].name == "fc.weight"


def test_bf16_checkpoint(tmp_path):
    w = (torch.randn(32, 32) * (torch.rand(32, 32) < 0.3)).to(torch.bfloat16)
    torch.save({"w": w}, tmp_path / "b.bin")
    assert read_patterns(tmp_path / "b.bin")[0][0].nnz == int((w != 0).sum())


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.path}",))


def test_pickle_carrying_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2, 2), "evil": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match=r"evil.pt: cannot be read as a PyTorch checkpoint "
                                          r"with weights_only=True"):
        read_patterns(tmp_path / "evil.pt")
    assert not marker.exists()


def test_not_a_state_dict(tmp_path):
    torch.save(torch.zeros(3, 3), tmp_path / "t.pt")
    with pytest.raises(FormatError, match="expected a state dict, found Tensor"):
        read_patterns(tmp_path / "t.pt")
