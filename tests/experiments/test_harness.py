"""The study harness: a toy system end to end (the README's "Adding a system"), the command line in any
order, and one-line errors with exit codes."""
import errno
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import harness
from jaxemb.data.sources import ArraySource
from jaxemb.train import NonFiniteLoss, core_config


# -- a toy system through the harness: one task, one source, one config ------------------------------------
def get_config(name="default"):
    c = core_config()
    c.data = dict(source="synthetic", rows=200, valid_rows=50)
    c.model = dict(dim=3)
    c.train.update(steps=40, batch_size=16, log_every=10, eval_every=20, eval_batches=4, checkpoint_every=20,
                   progress=False)
    c.optim.update(lr=0.1, warmup_steps=0, weight_decay=0.0)
    if name != "default":
        raise ValueError(f"unknown config {name!r}; expected 'default'")
    return c


class LinearTask:  # least squares y ~ x . w, weighted by the batch's `weights`
    def __init__(self, dim):
        self.dim = dim

    def init(self, rng, batch):
        return {"w": jnp.zeros(self.dim)}

    def loss(self, params, batch, rng):
        w = batch["weights"]
        return jnp.sum(w * (batch["x"] @ params["w"] - batch["y"]) ** 2) / jnp.maximum(w.sum(), 1.0), {}


def toy_main(argv):
    args, cfg = harness.parse(argv, "toy least squares", get_config, "runs/toy")
    rng = np.random.default_rng(cfg.seed)
    x = rng.normal(size=(cfg.data.rows + cfg.data.valid_rows, cfg.model.dim)).astype(np.float32)
    y = (x @ np.arange(1.0, cfg.model.dim + 1) + 0.1 * rng.normal(size=len(x))).astype(np.float32)
    n, b = cfg.data.rows, cfg.train.batch_size
    train = ArraySource({"x": x[:n], "y": y[:n]}, b, seed=cfg.seed, shuffle=True, drop_last=True)
    valid = ArraySource({"x": x[n:], "y": y[n:]}, b)  # 50 rows: the last batch is 2 rows + 14 of padding
    v = harness.train_variant("linear", LinearTask(cfg.model.dim), cfg, args.workdir, train, valid)
    rows = [{"variant": v.name, "valid mse": harness.evaluate(v, valid)["loss"], "steps": v.result.steps}]
    harness.print_table(rows, "toy least squares")
    harness.plot(os.path.join(args.workdir, "loss.png"), [dict(lines=[dict(x=[0, 1], y=[2.0, 1.0], label="demo")])])
    return harness.write_results(args.workdir, "results.json", {"table": rows, "w": np.asarray(v.params["w"]).tolist()},
                                 cfg, {"valid_rows": valid.num_rows})
# ------------------------------------------------------------------------------------------------------------


def test_toy_system_trains_end_to_end_and_writes_results(tmp_path, capsys):
    wd = tmp_path / "run"
    res = toy_main(["--workdir", str(wd), "train.steps=40", "--config", "default", "mesh.num_devices=1"])
    assert "valid mse" in capsys.readouterr().out and (wd / "loss.png").stat().st_size > 3000
    saved = json.load(open(wd / "results.json"))
    assert saved["config"]["train"]["steps"] == 40 and saved["derived"] == {"valid_rows": 50}
    assert saved["table"][0]["steps"] == 40 and (wd / "linear" / "checkpoints").is_dir()
    # the eval mean is exact over the 50 validation rows (padding excluded), against float64
    rng = np.random.default_rng(0)
    x = rng.normal(size=(250, 3)).astype(np.float32)
    y = (x @ np.arange(1.0, 4) + 0.1 * rng.normal(size=250)).astype(np.float32)
    w = np.asarray(saved["w"], np.float64)
    want = np.mean((x[200:].astype(np.float64) @ w - y[200:]) ** 2)
    np.testing.assert_allclose(res["table"][0]["valid mse"], want, rtol=1e-5)
    assert want < 2.0  # it learned (the untrained mse is ~14)
    again = toy_main(["--workdir", str(wd)])  # resumes the finished run: no training, the same numbers
    assert again["w"] == res["w"]


def test_options_and_overrides_mix_in_any_order(tmp_path):
    from experiments.configs.lexinvariant import get_config as lex_config
    w = str(tmp_path / "w")
    args, cfg = harness.parse(["--config", "tiny", 'study.kinds=["standard"]', "--workdir", w, "train.steps=3",
                               "tasks", "--data", "pydoc"], "d", lex_config, "x", commands=("tasks", "semi"))
    assert (args.config, args.workdir, args.command) == ("tiny", w, "tasks") and os.path.isdir(w)
    assert (cfg.study.kinds, cfg.train.steps, cfg.data.source, cfg.data.seq_len) == (["standard"], 3, "pydoc", 32)
    for argv in (["--bogus", "1"], ["train.steps=3", "stray"], ["tasks", "semi"], ["--work", w]):
        with pytest.raises(SystemExit) as e:
            harness.parse(argv + ["--workdir", w], "d", lex_config, "x", commands=("tasks", "semi"))
        assert e.value.code == 2
    with pytest.raises(KeyError, match="unknown config key 'train.stepz'; known keys under 'train': accum_steps"):
        harness.parse(["--workdir", w, "train.stepz=3"], "d", lex_config, "x")


def _cli(main, capsys, monkeypatch):
    monkeypatch.setenv("JAXEMB_TCMALLOC", "0")
    with pytest.raises(SystemExit) as e:
        harness.run_cli(main)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return e.value.code, err


def test_os_errors_are_one_line_with_the_message_and_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    cases = {"dangling": "No such file or directory (a symbolic link to", "file": "Not a directory",
             "file/sub": "Not a directory"}
    for where, msg in cases.items():
        path = str(tmp_path / where)
        code, err = _cli(lambda: toy_main(["--workdir", path]), capsys, monkeypatch)
        assert code == 2 and msg in err and path in err, err
    for exc, code in [(PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/ro/w"), 2),
                      (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/w"), 1)]:
        got, err = _cli(lambda: (_ for _ in ()).throw(exc), capsys, monkeypatch)
        assert got == code and f"{exc.strerror}: '{exc.filename}'" in err and "error: 13" not in err


def test_run_failures_and_bad_input_exit_codes(tmp_path, capsys, monkeypatch):
    def nonfinite():
        raise NonFiniteLoss("non-finite loss (nan) or gradient norm at step 3; training stopped")
    assert _cli(nonfinite, capsys, monkeypatch)[0] == 1
    code, err = _cli(lambda: toy_main(["--workdir", str(tmp_path), "optim.lr=abc"]), capsys, monkeypatch)
    assert code == 2 and "optim.lr" in err
    code, err = _cli(lambda: toy_main(["--workdir", str(tmp_path), "--config", "huge"]), capsys, monkeypatch)
    assert code == 2 and "unknown config 'huge'" in err
