"""Training in subprocesses: SIGKILL and resume; two processes with jax.distributed on CPU."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

SCRIPT = os.path.join(os.path.dirname(__file__), "train_script.py")


def _env(devices):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _run(workdir, steps, devices=1, extra=()):
    subprocess.run([sys.executable, SCRIPT, str(workdir), str(steps), *extra], env=_env(devices), check=True,
                   timeout=600, capture_output=True)


def _params(workdir):
    with np.load(os.path.join(workdir, "final.npz")) as z:
        return {k: z[k] for k in z.files}


def _checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    steps = 30
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(killed), str(steps)], env=_env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _checkpoints(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = _checkpoints(killed)
    assert reached and max(reached) < steps, f"run was not killed mid-way (checkpoints {reached})"
    assert not (killed / "final.npz").exists()
    _run(killed, steps)  # resumes from the latest checkpoint
    _run(tmp_path / "straight", steps)
    a, b = _params(killed), _params(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    la = json.load(open(killed / "losses.json"))
    lb = json.load(open(tmp_path / "straight" / "losses.json"))
    assert len(la) == steps and la == lb


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one_process(tmp_path):
    port = _free_port()
    multi = tmp_path / "multi"
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(multi), "4", "--process-id", str(i),
                               "--num-processes", "2", "--port", str(port)], env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    _run(tmp_path / "single", 4, devices=4)
    lm = json.load(open(multi / "losses.json"))
    ls = json.load(open(tmp_path / "single" / "losses.json"))
    assert len(lm) == 4
    np.testing.assert_allclose(lm, ls, rtol=1e-5)
    a, b = _params(multi), _params(tmp_path / "single")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
