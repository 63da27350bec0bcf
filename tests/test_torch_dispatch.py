"""backend="auto": the margin over dense, the timing budget, the INFO log, re-timing.

The paths are fakes that advance a fake clock (``sparse._clock``) by a set cost per call,
so every timing is exact and the tests do not depend on this machine's load."""
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import regroup  # noqa: E402
from regroup.adapters.torch import BlockSparseLinear, DispatchRecord  # noqa: E402
from regroup.adapters.torch import sparse  # noqa: E402

LOGGER = "regroup.adapters.torch.sparse"


class FakeClock:
    """``now()`` is the time; ``path(p)`` is a fake path run that costs ``cost[p]``."""

    def __init__(self, **cost: float) -> None:
        self.t = 0.0
        self.cost = dict(cost)
        self.calls: list[str] = []

    def now(self) -> float:
        return self.t

    def run(self, p: str) -> torch.Tensor:
        self.calls.append(p)
        self.t += self.cost[p]
        return torch.zeros(1)


@pytest.fixture
def module():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)) * (rng.random((64, 64)) < 0.2)
    r = regroup.regroup_pattern(regroup.from_array(w, name="fc.weight"), block=16,
                                format="grid", method="sort")
    return BlockSparseLinear(r, torch.tensor(w, dtype=torch.float32))


def _fake(monkeypatch, **cost) -> FakeClock:
    clock = FakeClock(**cost)
    monkeypatch.setattr(sparse, "_clock", clock.now)
    return clock


X = torch.zeros(8, 64)
KEY = ("cpu", torch.float32, 8, (64,), False)     # X's input class, in inference


@pytest.mark.parametrize("ratio, want", [(0.5, "bsr"), (0.94, "bsr"), (0.95, "dense"),
                                         (0.96, "dense"), (1.5, "dense")])
def test_a_sparse_path_must_beat_dense_by_the_margin(module, monkeypatch, ratio, want):
    clock = _fake(monkeypatch, dense=0.001, bsr=0.001 * ratio)
    with torch.no_grad():
        assert module.core.choose(X, clock.run) == want
    rec = module.dispatch_records[KEY]
    assert rec.path == want == next(iter(module.dispatch_log.values()))
    assert rec.times == pytest.approx({"dense": 0.001, "bsr": 0.001 * ratio})


_SHARED: dict = {}


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.tuples(st.floats(1e-4, 1e-2), st.floats(1e-4, 1e-2)),
                      min_size=1, max_size=40))
def test_the_choice_is_never_measured_slower_than_dense_by_the_margin(costs):
    """Noisy paths (every call its own cost): each path's time is the best of its timed
    calls (all but its warm-up), and a sparse choice beat dense by the margin in them."""
    if "mod" not in _SHARED:
        rng = np.random.default_rng(1)
        w = rng.standard_normal((64, 64)) * (rng.random((64, 64)) < 0.2)
        r = regroup.regroup_pattern(regroup.from_array(w), block=16, method="sort")
        _SHARED["mod"] = BlockSparseLinear(r, torch.tensor(w, dtype=torch.float32))
    core = _SHARED["mod"].core
    core.dispatch_records.clear()
    seq = iter(costs * 100)
    t = [0.0]
    seen: dict[str, list[float]] = {"dense": [], "bsr": []}

    def run(p):
        c = dict(zip(("dense", "bsr"), next(seq)))[p]
        seen[p].append(c)
        t[0] += c

    old = sparse._clock
    sparse._clock = lambda: t[0]
    try:
        with torch.no_grad():
            path = core.choose(X, run)
    finally:
        sparse._clock = old
    rec = core.dispatch_records[KEY]
    assert rec.times == pytest.approx({p: min(c[1:]) for p, c in seen.items()}, rel=1e-9)
    assert all(len(c) == rec.rounds + 1 for c in seen.values())
    assert path == ("bsr" if rec.times["bsr"] < 0.95 * rec.times["dense"] else "dense")


def test_the_timing_stays_within_its_budget(module, monkeypatch):
    clock = _fake(monkeypatch, dense=0.004, bsr=0.002)
    module.core.time_budget = 0.05
    with torch.no_grad():
        module.core.choose(X, clock.run)
    rec = module.dispatch_records[KEY]
    # A warm-up and a timed call of each (12 ms), then rounds of 6 ms while they fit.
    assert rec.rounds == 7 and rec.seconds == pytest.approx(0.048)
    assert len(clock.calls) == 2 * 2 + 2 * (rec.rounds - 1)
    assert clock.t == pytest.approx(rec.seconds)          # choose() times, runs nothing


def test_a_path_slower_than_the_budget_is_timed_once(module, monkeypatch):
    clock = _fake(monkeypatch, dense=0.3, bsr=0.1)
    module.core.time_budget = 0.2
    with torch.no_grad():
        assert module.core.choose(X, clock.run) == "bsr"
    rec = module.dispatch_records[KEY]
    assert rec.rounds == 1 and clock.calls == ["dense", "dense", "bsr", "bsr"]
    assert rec.seconds == pytest.approx(0.8)       # the minimum: warm-up + one call each


def test_fast_paths_stop_at_the_round_limit(module, monkeypatch):
    clock = _fake(monkeypatch, dense=1e-6, bsr=1e-6)
    with torch.no_grad():
        module.core.choose(X, clock.run)
    assert module.dispatch_records[KEY].rounds == 30


def test_each_choice_is_logged_at_info_with_its_times(module, monkeypatch, caplog):
    clock = _fake(monkeypatch, dense=0.002, bsr=0.001)
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        module.core.choose(X, clock.run)
        module.core.choose(X, clock.run)            # known class: no new timing
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    msg = records[0].getMessage()
    assert msg.startswith("fc.weight: bsr for input (<=8, 64) float32 on cpu, no grad")
    assert "dense 2 ms, bsr 1 ms; first call" in msg and "budget 200 ms" in msg


def test_a_choice_that_proves_slower_than_dense_is_timed_again(module, monkeypatch, caplog):
    clock = _fake(monkeypatch, dense=0.002, bsr=0.001)
    core = module.core
    key = KEY
    with torch.no_grad():
        core.dispatch(X, clock.run)
        assert core.dispatch_log[key] == "bsr"
        clock.cost["bsr"] = 0.0025                      # the sparse path slows down
        with caplog.at_level(logging.INFO, logger=LOGGER):
            for _ in range(sparse.CHECK_EVERY * sparse.CHECK_SAMPLES - 2):
                core.dispatch(X, clock.run)
            assert core.dispatch_log[key] == "bsr"      # two slow checks: not yet
            assert len(core.dispatch_records[key].samples) == 2
            core.dispatch(X, clock.run)                 # the third check re-times
    rec = core.dispatch_records[key]
    assert core.dispatch_log[key] == rec.path == "dense" and rec.timings == 2
    assert rec.times == pytest.approx({"dense": 0.002, "bsr": 0.0025})
    msg = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(msg) == 1 and msg[0].startswith("fc.weight: dense for input") and \
        "re-timed: bsr took 2.5 ms at best in the last 3 checks, dense 2 ms" in msg[0]
    # Dense is the reference: it is never checked.
    n = len(clock.calls)
    with torch.no_grad():
        for _ in range(2 * sparse.CHECK_EVERY):
            core.dispatch(X, clock.run)
    assert clock.calls[n:] == ["dense"] * (2 * sparse.CHECK_EVERY)


def test_checks_that_only_look_slow_back_off(module, monkeypatch):
    """A check sees the live call (cold caches, other work) against dense's best: when the
    re-timing confirms the choice, the checks come at twice the interval."""
    clock = _fake(monkeypatch, dense=0.002, bsr=0.003)
    calls = []

    def fake_time(run, paths, budget, device="cpu"):
        calls.append(paths)
        return {"dense": 0.002, "bsr": 0.001}, 5, 0.01

    monkeypatch.setattr(sparse, "time_paths", fake_time)
    core = module.core
    with torch.no_grad():
        for _ in range(sparse.CHECK_EVERY * sparse.CHECK_SAMPLES + 1):
            core.dispatch(X, clock.run)
    rec = core.dispatch_records[KEY]
    assert len(calls) == 2 and rec.path == "bsr" and rec.timings == 2
    assert rec.every == 2 * sparse.CHECK_EVERY and rec.samples == []


def test_training_calls_are_not_checked(module, monkeypatch):
    clock = _fake(monkeypatch, dense=0.002, bsr=0.001)
    x = torch.zeros(8, 64)
    module.core.dispatch(x, clock.run)                  # grad enabled: its own class
    rec = module.dispatch_records[("cpu", torch.float32, 8, (64,), True)]
    for _ in range(4 * sparse.CHECK_EVERY):
        module.core.dispatch(x, clock.run)
    assert rec.calls == 0 and rec.samples == []


def test_real_modules_record_their_measurements(module):
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = module(x)
    torch.testing.assert_close(y, x @ module.dense_weight().T, rtol=1e-5, atol=1e-5)
    (key, rec), = module.dispatch_records.items()
    assert isinstance(rec, DispatchRecord) and set(rec.times) == {"dense", "bsr"}
    assert module.dispatch_log[key] == rec.path and rec.seconds <= sparse.TIME_BUDGET + 0.1
