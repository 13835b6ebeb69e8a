"""The optional-system-piece markers of tests/conftest.py: a missing piece skips with a one-line reason, and
fails the test under CI=true. Runs an inner pytest with the real conftest, Unifont made to look missing."""
import os
import subprocess
import sys

CONFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")
FAKE = ('\nOPTIONAL["requires_unifont"] = OPTIONAL["requires_unifont"]._replace(present=lambda: False)'
        '\nOPTIONAL["requires_tcmalloc"] = OPTIONAL["requires_tcmalloc"]._replace(present=lambda: True)\n')
INNER = '''import pytest


@pytest.mark.requires_unifont
def test_needs_the_missing_piece():
    pass


@pytest.mark.requires_tcmalloc
def test_needs_a_present_piece():
    pass


def test_needs_nothing():
    pass
'''
REASON = "GNU Unifont (/usr/share/unifont/unifont.hex) is not installed (apt-get install unifont)"


def _inner(tmp_path, ci):
    with open(CONFTEST) as f:
        (tmp_path / "conftest.py").write_text(f.read() + FAKE)
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", "test_inner.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_missing_piece_skips_with_its_reason_outside_ci(tmp_path):
    p = _inner(tmp_path, None)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "2 passed, 1 skipped" in p.stdout
    assert f"SKIPPED [1] test_inner.py:4: {REASON}\n" in p.stdout  # -rs: the test's line, what, how to install


def test_missing_piece_fails_under_ci(tmp_path):
    p = _inner(tmp_path, "true")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    assert "1 failed, 2 passed" in p.stdout and "skipped" not in p.stdout
    assert f"FAILED test_inner.py::test_needs_the_missing_piece - Failed: CI=true and {REASON}" in p.stdout
