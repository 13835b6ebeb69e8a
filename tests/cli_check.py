"""Runs an entry point as a user would and checks that bad input ends it with one clear error."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, timeout=300):
    """`python -m module args` from the repository root on one CPU device; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))


def assert_usage_error(module, args, *needles, one_line=True):
    """The run exits 2 (argparse's usage code) with every needle in stderr, no traceback, and, where
    one_line, a single line of stderr."""
    p = run_module(module, *args)
    err = p.stderr.strip()
    assert p.returncode == 2, err[-2000:]
    assert all(n in err for n in needles) and "Traceback" not in err, err[-2000:]
    if one_line:
        assert len(err.splitlines()) == 1, err[-2000:]
