"""The tcmalloc re-run of the command-line entry points (jaxemb/runtime.py)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# every test here needs tcmalloc installed: skipped without it, a failure under CI=true (tests/conftest.py)
pytestmark = pytest.mark.requires_tcmalloc
PROBE = "from jaxemb import runtime; runtime.use_tcmalloc(); print('loaded', runtime.tcmalloc_loaded())"


def _run(env_extra, code=PROBE):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JAXEMB_TCMALLOC_REEXEC")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=True)


def test_entry_point_reruns_with_tcmalloc():
    out = _run({})
    assert out.stdout.strip() == "loaded True", out.stderr


def test_opt_out_keeps_the_system_allocator():
    out = _run({"JAXEMB_TCMALLOC": "0"})
    assert out.stdout.strip() == "loaded False"


def test_reruns_at_most_once():
    # the guard variable stops a second re-run even when the preload did not take
    out = _run({"JAXEMB_TCMALLOC_REEXEC": "1"})
    assert out.stdout.strip() == "loaded False"


def test_study_entry_points_rerun_with_tcmalloc():
    # every `python -m experiments.<study>` goes through run_cli
    code = ("from experiments.harness import run_cli; from jaxemb import runtime; "
            "run_cli(lambda: print('loaded', runtime.tcmalloc_loaded()))")
    out = _run({}, code)
    assert out.stdout.strip() == "loaded True", out.stderr
