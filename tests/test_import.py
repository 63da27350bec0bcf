import subprocess
import sys

import regroup


def test_import_does_not_load_torch():
    code = "import sys, regroup, regroup.io, regroup.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_public_api_is_listed():
    for name in regroup.__all__:
        assert hasattr(regroup, name), name
    assert "regroup_pattern" in regroup.__all__ and "load_result" in regroup.__all__
