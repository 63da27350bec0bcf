"""Real pruned masks (DLMC): auto never retains less than no regrouping, in both formats."""
import pytest

from regroup import RegroupError, read_patterns, regroup_pattern

from .conftest import DLMC, dlmc_files

FILES = dlmc_files()


def test_dlmc_is_complete(dlmc_dir):
    assert len(FILES) == 108


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(DLMC)) for p in FILES])
def test_auto_at_least_identity_both_formats(path):
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
