"""CI cannot go green on missing data: with UVOOD_DATA set, a missing or corrupt data file fails the tests that
need it; without UVOOD_DATA they skip, saying why, and never look elsewhere (e.g. ../shared/data)."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, require_data_file

PROBE = '''
from uvood.data import load


def test_probe(data_dir):
    load("mnist", "test", data_dir=data_dir, limit=10)
'''


def _pytest(tmp_path, uvood_data):
    """Run a probe test that needs the data, with the project's conftest, in a fresh pytest process."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "UVOOD_DATA"}
    if uvood_data is not None:
        env["UVOOD_DATA"] = str(uvood_data)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    return out.returncode, out.stdout + out.stderr


def test_without_uvood_data_the_tests_skip_with_their_reason(tmp_path):
    rc, out = _pytest(tmp_path, None)
    assert rc == 0 and "1 skipped" in out and "UVOOD_DATA is not set" in out, out


def test_with_uvood_data_a_missing_file_fails(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out = _pytest(tmp_path, empty)
    assert rc == 1 and "1 error" in out and "mnist_test.npz is not in it" in out and "skipped" not in out, out


def test_with_uvood_data_a_corrupt_file_fails(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mnist_test.npz").write_bytes(b"not an npz file")
    rc, out = _pytest(tmp_path, bad)
    assert rc == 1 and "1 failed" in out and "mnist_test.npz" in out and "skipped" not in out, out


def test_require_data_file_fails_or_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("UVOOD_DATA", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="textures10_all_jpeg.npz is not in it"):
        require_data_file(tmp_path, "textures10_all_jpeg.npz")
    monkeypatch.delenv("UVOOD_DATA")
    with pytest.raises(pytest.skip.Exception, match="UVOOD_DATA is not set"):
        require_data_file(tmp_path, "textures10_all_jpeg.npz")
    (tmp_path / "textures10_all_jpeg.npz").write_bytes(b"")
    assert require_data_file(tmp_path, "textures10_all_jpeg.npz") == tmp_path / "textures10_all_jpeg.npz"
