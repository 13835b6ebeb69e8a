"""Shared pieces of the benchmark scripts: the machine description (with the CPU model) and the XLA:CPU
oneDNN switch, which every benchmark can report both ways."""
from __future__ import annotations

import os
import platform
import subprocess

ONEDNN_FLAG = "--xla_cpu_use_onednn"  # XLA:CPU's oneDNN matmul/convolution thunks (jaxlib 0.10.2 .. 0.12)
ONEDNN_MODES = ("default", "on", "off", "both")


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9654 96-Core Processor": lscpu's "Model name", else
    /proc/cpuinfo's "model name", else platform.processor(); "unknown CPU" when none says."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, LC_ALL="C")).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name" and value.strip() and value.strip() != "-":
                return value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def host() -> dict:
    """What describes the host without touching JAX (safe in a parent process that must not grab the GPU)."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def machine() -> dict:
    """The study's machine description (backend, device, JAX version, date) plus the CPU model and flags."""
    from experiments.harness import machine as study_machine
    return dict(study_machine(), **host())


def machine_line(m: dict) -> str:
    """One line naming the machine for a table heading."""
    dev = m.get("device", "?")
    cpu = f"{m['cpu_model']}, {m['cpu_count']} CPUs"
    where = cpu if m.get("backend", "cpu") == "cpu" else f"{dev} ({m.get('num_devices', 1)} device(s)), host {cpu}"
    flags = f", XLA_FLAGS={m['xla_flags']}" if m.get("xla_flags") else ""
    return f"{m.get('date', '')}, {m.get('backend', '?')}: {where}, jax {m.get('jax', '?')}{flags}"


def set_onednn(mode: str) -> None:
    """Adds the oneDNN switch to XLA_FLAGS for mode 'on' or 'off' ('default' leaves XLA's default). Must run
    before JAX's first computation: XLA reads XLA_FLAGS when its CPU backend starts."""
    if mode not in ONEDNN_MODES[:3]:
        raise ValueError(f"onednn mode must be one of {ONEDNN_MODES[:3]}, got {mode!r}")
    if mode == "default":
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(ONEDNN_FLAG + "=")]
    flags.append(f"{ONEDNN_FLAG}={'true' if mode == 'on' else 'false'}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def rerun_each_onednn(module: str, argv: list, out_flag: str, out_path: str) -> dict:
    """Runs `python -m module argv --onednn off|on` once per setting (each its own process, since the flag
    takes effect only at start-up) with its results in out_path + '.off' / '.on'; returns
    {setting: path of its results}. Raises if a run fails."""
    import sys
    paths = {}
    for mode in ("off", "on"):
        path = f"{out_path}.{mode}"
        cmd = [sys.executable, "-m", module, *argv, "--onednn", mode, out_flag, path]
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        paths[mode] = path
    return paths


def strip_option(argv: list, name: str) -> list:
    """argv without `name VALUE` / `name=VALUE` (to re-run a command with a different value)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out
