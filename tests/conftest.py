"""Test-session set-up: 8 simulated CPU devices, so sharded code paths run here.

Must run before JAX initialises its backends; pytest imports conftest first.
"""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))

# A compilation cache for this test session only: the studies' tests build the same tiny models many
# times over (each Trainer jits its own step), and identical programs then compile once.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_cache = tempfile.mkdtemp(prefix="jaxemb-test-xla-cache-")
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import sys  # noqa: E402

# tests import small shared helpers (tests/train/helpers.py) by name
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))

# Optional system pieces. A test that needs one carries a marker (`@pytest.mark.requires_unifont`,
# `@pytest.mark.requires_tcmalloc`); it runs when the piece is installed and otherwise skips with a one-line
# reason. Under CI=true (.ci/run installs both) a missing piece fails the test instead: CI never skips.
import collections  # noqa: E402

import pytest  # noqa: E402

Piece = collections.namedtuple("Piece", "what install present")


def _unifont_present():
    from jaxemb.data.glyphs import UNIFONT_PATHS
    return any(os.path.exists(p) for p in UNIFONT_PATHS)


def _tcmalloc_present():
    from jaxemb.runtime import find_tcmalloc
    return find_tcmalloc() is not None


def _transformers_present():
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


OPTIONAL = {
    "requires_transformers": Piece("PyTorch + Hugging Face transformers (the reference models)",
                                   "pip install transformers safetensors; torch: the CPU wheel",
                                   _transformers_present),
    "requires_unifont": Piece("GNU Unifont (/usr/share/unifont/unifont.hex)", "apt-get install unifont",
                              _unifont_present),
    "requires_tcmalloc": Piece("tcmalloc (libtcmalloc_minimal.so.4)", "apt-get install libtcmalloc-minimal4",
                               _tcmalloc_present),
}


def in_ci():
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config):
    for name, piece in OPTIONAL.items():
        config.addinivalue_line("markers", f"{name}: needs {piece.what}; skips without it, fails under CI=true")


def _missing(item):
    """One line naming the first optional piece this test needs that is not installed, or None."""
    for name, piece in OPTIONAL.items():
        if item.get_closest_marker(name) is not None and not piece.present():
            return f"{piece.what} is not installed ({piece.install})"
    return None


def pytest_collection_modifyitems(config, items):
    if not in_ci():
        for item in items:
            reason = _missing(item)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))  # reported at the test's own line


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    reason = _missing(item)  # reached only under CI=true: skipped at collection otherwise
    if reason:
        pytest.fail(f"CI=true and {reason}; .ci/run installs it", pytrace=False)
