"""Recovery by distillation: the loss falls, the block masks stay, every model kind trains."""
import copy
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from regroup import RegroupError  # noqa: E402
from regroup.adapters.torch import (layer_masks, recover, regroup_model,  # noqa: E402
                                    teacher_outputs, to_block_sparse)

from .torch_zoo import zoo  # noqa: E402


def _student(name: str, mode: str = "fold"):
    make, inp = zoo()[name]
    torch.manual_seed(0)
    teacher = make().eval()
    student = copy.deepcopy(teacher)
    for m in student.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(m, "weight", amount=0.7)
    x = inp()
    plan = regroup_model(student, block=8, mode=mode, example_inputs=(x,))
    return teacher, student, plan, inp


def _gap(student, teacher, batches) -> float:
    with torch.no_grad():
        return float(sum(((student(x) - teacher(x)) ** 2).mean() for x in batches))


@pytest.mark.parametrize("name,mode", [("mlp", "fold"), ("cnn", "fold"),
                                       ("transformer", "runtime")])
def test_recovery_closes_the_gap_and_keeps_the_block_masks(name, mode):
    teacher, student, plan, inp = _student(name, mode)
    torch.manual_seed(1)
    data = [inp() for _ in range(16)]
    held_out = [inp() for _ in range(4)]
    before = {k: (v[1].clone(), v[0].detach().clone()) for k, v in layer_masks(student).items()}
    gap0 = _gap(student.eval(), teacher, held_out)
    # Eval mode: BatchNorm statistics from batches of 2-6 random inputs would be noise.
    log = recover(student, teacher, data, steps=80, lr=3e-3, train_mode=False)
    assert log.steps == 80 and len(log.losses) == 80 and log.stopped is None
    assert not student.training                         # its mode is restored
    # The training loss falls (the last pass over the data against the first batch), and
    # so does the gap on inputs it never saw (less: 16 small batches overfit).
    assert np.mean(log.losses[-16:]) < 0.5 * log.losses[0]
    assert _gap(student, teacher, held_out) < 0.8 * gap0
    for k, (w0, mask, _) in layer_masks(student).items():
        np.testing.assert_array_equal(mask.numpy(), before[k][0].numpy(), err_msg=k)
        assert (w0[~mask.bool()] == 0).all(), k
        if k in plan.layers:          # the regrouped layers: exactly their block mask
            want = plan.current_result(k).mask
            np.testing.assert_array_equal(mask.numpy().astype(bool), want, err_msg=k)
        assert not torch.equal(w0[mask.bool()], before[k][1][mask.bool()]), k   # trained
    assert set(plan.layers) <= set(before)


def test_block_sparse_model_recovers_with_its_values_only():
    teacher, student, plan, inp = _student("mlp")
    to_block_sparse(student, plan, backend="bsr")
    shapes = {n: p.shape for n, p in student.named_parameters()}
    torch.manual_seed(1)
    data = [inp() for _ in range(16)]
    gap0 = _gap(student.eval(), teacher, data[:4])
    recover(student, teacher, data, steps=60, lr=3e-3, train_mode=False)
    assert _gap(student.eval(), teacher, data[:4]) < 0.7 * gap0
    assert {n: p.shape for n, p in student.named_parameters()} == shapes


@dataclass
class _Out:
    last_hidden_state: torch.Tensor


class _DictModel(nn.Module):
    """Called with keyword tensors and returning a Hugging Face-like output object."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        return _Out(self.fc(input_ids) * attention_mask[..., None])


def test_dict_batches_output_objects_kl_callback_and_generators():
    torch.manual_seed(0)
    teacher = _DictModel()
    student = copy.deepcopy(teacher)
    prune.l1_unstructured(student.fc, "weight", amount=0.5)
    batch = {"input_ids": torch.randn(4, 3, 16), "attention_mask": torch.ones(4, 3)}
    seen = []
    log = recover(student, teacher, [batch], steps=10, lr=1e-2, loss="kl", temperature=2.0,
                  callback=lambda step, loss: seen.append(step) or step == 4)
    assert log.stopped == "callback" and log.steps == 4 and seen == [1, 2, 3, 4]
    log = recover(student, teacher, (batch for _ in range(3)), steps=10, lr=1e-2)
    assert log.stopped == "data exhausted" and log.steps == 3
    log = recover(student, teacher, [batch], steps=3, loss=lambda s, t: (s - t).abs().mean(),
                  output=lambda out: out.last_hidden_state[:, 0])
    assert log.steps == 3


def test_weights_no_mask_holds_are_masked_before_training():
    """A layer the plan skips (smaller than the block), pruned by zeroing, keeps its
    zeros: recover masks it first and says so."""
    make, inp = zoo()["mlp"]
    torch.manual_seed(0)
    teacher = make().eval()
    student = copy.deepcopy(teacher)
    for m in student.modules():
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", amount=0.7)
            prune.remove(m, "weight")          # plain zeros, no mask left
    x = inp()
    plan = regroup_model(student, block=16, mode="runtime", example_inputs=(x,))
    assert "head.weight" in plan.skipped                # 10 x 80: smaller than the block
    zeros = student.head.weight.detach() == 0
    log = recover(student, teacher, [inp() for _ in range(4)], steps=8, lr=1e-2,
                  train_mode=False)
    assert log.held == ["head.weight"]
    assert bool((student.head.weight.detach()[zeros] == 0).all())
    assert not torch.equal(student.head.weight.detach()[~zeros],
                           teacher.head.weight.detach()[~zeros])


def test_progress_lines(capsys):
    teacher, student, _, inp = _student("mlp")
    recover(student, teacher, [inp()], steps=4, progress=True, log_every=2)
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[2] for line in err] == ["2/4", "4/4"]


def test_refuses_an_unmasked_model_and_bad_parameters():
    make, inp = zoo()["mlp"]
    teacher = make()
    with pytest.raises(RegroupError, match="holds a mask"):
        recover(copy.deepcopy(teacher), teacher, [inp()], steps=1)
    _, student, _, _ = _student("mlp")
    for kwargs, name, kind in [({"steps": 0}, "steps", ValueError),
                               ({"steps": 1.5}, "steps", TypeError),
                               ({"lr": -1.0}, "lr", ValueError),
                               ({"lr": float("nan")}, "lr", ValueError),
                               ({"lr": float("inf")}, "lr", ValueError),
                               ({"lr": "0.1"}, "lr", TypeError),
                               ({"loss": "l1"}, "loss", ValueError),
                               ({"temperature": 0}, "temperature", ValueError),
                               ({"log_every": 0}, "log_every", ValueError)]:
        with pytest.raises(kind, match=f"'{name}' parameter of recover"):
            recover(student, teacher, [inp()], **kwargs)
    with pytest.raises(ValueError, match="'data' parameter of recover yielded no batch"):
        recover(student, teacher, [], steps=2)


def test_precomputed_targets_train_exactly_as_the_teacher_does():
    """recover(targets=teacher_outputs(...)) is the same training as running the teacher
    each step (same losses, same weights), without calling the teacher; the teacher's
    mode is restored."""
    teacher, student, _, inp = _student("cnn")
    teacher.train()
    torch.manual_seed(1)
    batches = [inp() for _ in range(3)]
    twin = copy.deepcopy(student)
    targets = teacher_outputs(teacher, batches)
    assert teacher.training and len(targets) == 3
    a = recover(student, teacher, batches, steps=7, lr=1e-2, train_mode=False)
    b = recover(twin, None, batches, steps=7, lr=1e-2, train_mode=False, targets=targets)
    assert a.losses == b.losses and len(a.losses) == 7
    for (na, pa), (nb, pb) in zip(student.state_dict().items(), twin.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_targets_must_match_the_batches():
    teacher, student, _, inp = _student("mlp")
    batches = [inp(), inp()]
    targets = teacher_outputs(teacher, batches)
    with pytest.raises(ValueError, match="one tensor per batch of 'data' \\(2\\). Got 1"):
        recover(student, None, batches, steps=1, targets=targets[:1])
    with pytest.raises(TypeError, match="must be lists or tuples"):
        recover(student, None, iter(batches), steps=1, targets=targets)
    with pytest.raises(TypeError, match="'teacher' parameter of recover must be an nn.Module"):
        recover(student, None, batches, steps=1)
    with pytest.raises(TypeError, match="'data' parameter of teacher_outputs"):
        teacher_outputs(teacher, iter(batches))
