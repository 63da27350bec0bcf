"""Real pruned masks (DLMC): auto never retains less than no regrouping, nor than its
finalists (every member on small layers) run on their own with refinement, in both
formats; layouts are valid and their metrics recomputed from the stored masks agree.

The default suite runs a sample (the smallest matrix of every ResNet-50 pruning method and
of the magnitude-pruned Transformer); the full sweep over all 108 files runs under the
``slow`` marker:
``python -m pytest -m slow tests/test_dlmc.py``.
"""
import pytest

from regroup import RegroupError, check_layout, read_patterns, regroup_pattern
from regroup.partitioners.auto import PORTFOLIO

from .conftest import DLMC, dlmc_files, recompute_retained

FILES = dlmc_files()


def _smallest() -> list:
    """Per (model, pruning method): the smallest usable matrix."""
    best: dict[tuple[str, str], tuple[int, object]] = {}
    for p in FILES:
        model, method = p.relative_to(DLMC).parts[:2]
        with open(p) as f:
            n, m, nnz = (int(x) for x in f.readline().split(","))
        if nnz == 0 or min(n, m) < 32:
            continue
        if (model, method) not in best or n * m < best[(model, method)][0]:
            best[(model, method)] = (n * m, p)
    return [p for _, p in sorted(best.values(), key=lambda t: str(t[1]))]


SMALLEST = _smallest()
SAMPLE = [p for p in SMALLEST if p.relative_to(DLMC).parts[0] == "rn50"
          or p.relative_to(DLMC).parts[:2] == ("transformer", "magnitude_pruning")]


def _ids(paths):
    return [str(p.relative_to(DLMC)) for p in paths]


def test_dlmc_is_complete(dlmc_dir):
    assert len(FILES) == 108
    assert len(SMALLEST) == len({p.relative_to(DLMC).parts[:2] for p in FILES}) == 8
    assert len(SAMPLE) == 5


def _check(path, portfolio: bool):
    try:
        (pat,), _ = read_patterns(path)
    except RegroupError as exc:
        # One DLMC file (transformer VD 0.98 ffn_conv1) has nnz = 0: refused, with the reason.
        assert "empty (every entry is zero)" in str(exc)
        return
    for fmt in ("grid", "shuffled"):
        r = regroup_pattern(pat, block=32, format=fmt, method="auto", budget="iso")
        m = r.metrics
        assert m["retained"] >= m["retained_identity"], (fmt, m)
        assert r.mask.sum() <= pat.nnz
        check_layout(r.mask2d, fmt, (32, 32), r.row_perm, r.col_perm, r.panel_cols)
        assert recompute_retained(pat.matrix, r.mask2d) == pytest.approx(m["retained"])
        assert m["retained"] >= max(m["candidates_refined"].values()) - 1e-12
        if portfolio:
            assert set(m["candidates_refined"]) == set(PORTFOLIO)
            for cand in PORTFOLIO:
                direct = regroup_pattern(pat, block=32, format=fmt, method=cand, refine=True)
                assert direct.metrics["retained"] == pytest.approx(
                    m["candidates_refined"][cand]), (fmt, cand)
                assert m["retained"] >= direct.metrics["retained"] - 1e-12, (fmt, cand)


@pytest.mark.parametrize("path", SAMPLE, ids=_ids(SAMPLE))
def test_auto_is_the_best_refined_candidate_on_a_sample(path):
    _check(path, portfolio=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_auto_at_least_identity_both_formats(path):
    _check(path, portfolio=False)
