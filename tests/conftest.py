"""Test-session set-up: 8 simulated CPU devices, so sharded code paths run here.

Must run before JAX initialises its backends; pytest imports conftest first.
"""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))

import sys  # noqa: E402

# tests import small shared helpers (tests/train/helpers.py) by name
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
