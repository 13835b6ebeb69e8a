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
