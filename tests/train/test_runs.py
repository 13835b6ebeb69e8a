"""Runs that never lie and never hang: verified checkpoints, fallback past damaged ones, save failures,
one run per workdir, a workdir that remembers its config."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxemb.train import NonFiniteLoss, Trainer, core_config
from jaxemb.train.checkpoint import CheckpointError
from jaxemb.train.workdir import ConfigMismatch, WorkdirInUse
from helpers import ArraySource, Regression, regression_data

HERE = os.path.dirname(__file__)


def _cfg(steps=4, **train):
    c = core_config()
    c.train.update(dict(dict(steps=steps, batch_size=16, log_every=1, checkpoint_every=1, keep_checkpoints=10,
                             progress=False, async_checkpoints=False), **train))
    c.optim.update(warmup_steps=0, lr=1e-2)
    return c


def _fit(cfg, wd, capsys=None):
    return Trainer(Regression(), cfg, str(wd)).fit(ArraySource(regression_data(), 16))


def test_a_checkpoint_with_nonfinite_parameters_is_never_written(tmp_path):
    cfg = _cfg(steps=30)
    cfg.optim.update(lr=1e39)  # the first update overflows the parameters while the loss is still finite
    with pytest.raises(NonFiniteLoss, match="non-finite after step 1 .*no checkpoint was written yet"):
        _fit(cfg, tmp_path)
    assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))


class _Kick(Regression):
    """Regression whose loss value ignores batch['s'] but whose gradient is scaled by it."""

    def loss(self, params, batch, rng):
        base, m = super().loss(params, batch, rng)
        return jax.lax.stop_gradient(base) + batch["s"][0] * (base - jax.lax.stop_gradient(base)), m


def test_nonfinite_message_names_the_last_checkpoint_that_really_is_good(tmp_path):
    data = regression_data(n=48)
    data["s"] = np.repeat(np.float32([1e-33, 1e-33, 100.0]), 16)  # step 3's update overflows, its loss does not
    cfg = _cfg(steps=6)
    cfg.optim.update(name="sgd", b1=0.0, lr=1e38, schedule="constant", clip_norm=0.0)
    with pytest.raises(NonFiniteLoss, match="non-finite after step 3 .*last good checkpoint is step 2"):
        Trainer(_Kick(), cfg, str(tmp_path)).fit(ArraySource(data, 16))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


@pytest.mark.parametrize("how", ["truncate", "metadata"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, capsys, how):
    def damage(step_dir):
        if how == "truncate":
            for name in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True):
                with open(name, "r+b") as f:  # every data file of the step cut in half
                    f.truncate(os.path.getsize(name) // 2)
        else:
            os.remove(step_dir / "state" / "_METADATA")

    ref = _fit(_cfg(steps=4), tmp_path / "ref").state
    _fit(_cfg(steps=4), tmp_path / "run")
    damage(tmp_path / "run" / "checkpoints" / "4")
    capsys.readouterr()
    # the damaged step 4 is reported, kept aside, and step 3 is used; the rerun ends exactly where the first did
    res = Trainer(Regression(), _cfg(steps=4), str(tmp_path / "run")).fit(ArraySource(regression_data(), 16))
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if "cannot be read" in l]
    assert len(lines) == 1 and "checkpoint step 4" in lines[0] and "resumed from step 3" in out
    assert os.path.isdir(tmp_path / "run" / "checkpoints-damaged" / "4")
    np.testing.assert_array_equal(np.asarray(res.state["params"]["w"]), np.asarray(ref["params"]["w"]))


def test_a_failed_save_ends_the_run_with_an_error(tmp_path):
    os.makedirs(tmp_path / "file")
    (tmp_path / "file" / "checkpoints").write_text("not a directory")
    for async_save in (False, True):
        with pytest.raises(NotADirectoryError, match="checkpoints is a file"):
            _fit(_cfg(async_checkpoints=async_save), tmp_path / "file")


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    from helpers import ArraySource, Regression, regression_data
    from jaxemb.train import Trainer, core_config, checkpoint
    checkpoint.check_directory = lambda d: None  # let the save itself fail, in orbax's background threads
    open({wd!r} + "/checkpoints", "w").write("x")
    c = core_config()
    c.train.update(steps=4, batch_size=16, checkpoint_every=2, progress=False, async_checkpoints={async_save})
    Trainer(Regression(), c, {wd!r}).fit(ArraySource(regression_data(), 16))
""")


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_save_exits_nonzero_and_never_hangs(tmp_path, async_save):
    wd = str(tmp_path)
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(here=HERE, wd=wd, async_save=async_save)],
                       capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu"))
    assert p.returncode == 1
    assert "CheckpointError: saving checkpoint step 2" in p.stderr


def test_one_run_per_workdir_and_a_stale_lock_is_taken_over(tmp_path):

    lock = tmp_path / "run.lock"
    import socket
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    with pytest.raises(WorkdirInUse, match=f"in use by pid {os.getpid()}"):
        _fit(_cfg(steps=1), tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert _fit(_cfg(steps=1), tmp_path).steps == 1
    assert not lock.exists()  # released at the end


def test_a_rerun_with_another_config_is_refused_unless_told(tmp_path):
    _fit(_cfg(steps=3), tmp_path)
    with pytest.raises(ConfigMismatch, match=r"train.steps: 3 -> 5.*on_config_change=extend"):
        _fit(_cfg(steps=5), tmp_path)
    cfg = _cfg(steps=3)
    cfg.optim.lr = 0.5
    with pytest.raises(ConfigMismatch, match=r"optim.lr: 0.01 -> 0.5"):
        _fit(cfg, tmp_path)
    # logging and saving settings are not the computation
    assert _fit(_cfg(steps=3, log_every=2, checkpoint_every=3), tmp_path).steps == 3
    res = _fit(_cfg(steps=5, on_config_change="extend"), tmp_path)
    assert res.steps == 5 and int(res.state["step"]) == 5
    with pytest.raises(ConfigMismatch, match="would not extend"):
        _fit(_cfg(steps=2, on_config_change="extend"), tmp_path)
    res = _fit(_cfg(steps=2, on_config_change="fresh"), tmp_path)
    assert int(res.state["step"]) == 2
    old = glob.glob(str(tmp_path / "previous-*"))
    assert len(old) == 1 and os.path.isdir(os.path.join(old[0], "checkpoints"))
    assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 2
