"""Host-side runtime tuning for CPU runs: a caching memory allocator.

XLA:CPU allocates each step's temporary buffers afresh. With glibc's malloc, buffers over 32 MiB come from
mmap and go back to the kernel on free, so every step page-faults through all of its memory again: on a
2-core EPYC an elementwise pass over 84 MB ran at 4 GB/s instead of 34 GB/s, and the NFE-1 WN18RR step
spent a third of its time in page faults. tcmalloc keeps freed pages for reuse. An allocator must be
loaded before the process starts, so the command-line entry points call `use_tcmalloc()`, which re-runs
the same command once with tcmalloc in LD_PRELOAD when it is installed (Debian/Ubuntu:
`apt-get install libtcmalloc-minimal4`).

Set JAXEMB_TCMALLOC=0 to keep the system allocator. Nothing happens on non-Linux systems, when tcmalloc
is absent (a one-line notice), when an accelerator plugin (CUDA, TPU) is installed, or inside library use
(only the `__main__` blocks of experiments/ and benchmarks/ call it).
"""
from __future__ import annotations

import importlib.util
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc.so.4",
)
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu", "jax_rocm7_plugin")
_GUARD = "JAXEMB_TCMALLOC_REEXEC"


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    return next((p for p in CANDIDATES if os.path.exists(p)), None)


def tcmalloc_loaded() -> bool:
    """Whether this process runs with tcmalloc mapped (Linux /proc)."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" in f.read()
    except OSError:
        return False


def _has_accelerator_plugin() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def use_tcmalloc() -> bool:
    """Re-run this command with tcmalloc preloaded, if worthwhile and possible; returns False when it
    does not (it never returns when it re-runs). Call first thing in a `__main__` block."""
    if os.environ.get("JAXEMB_TCMALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if tcmalloc_loaded() or os.environ.get(_GUARD) or _has_accelerator_plugin():
        return False
    lib = find_tcmalloc()
    if lib is None:
        print("jaxemb: tcmalloc not found; CPU steps run slower with glibc malloc "
              "(apt-get install libtcmalloc-minimal4; JAXEMB_TCMALLOC=0 hides this)", file=sys.stderr)
        return False
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    env[_GUARD] = "1"  # at most one re-run, even if the preload does not take
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    return True  # not reached
