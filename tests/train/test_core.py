import json
import os

import jax
import numpy as np
import pytest

from experiments.configs.lexinvariant import get_config
from jaxemb.data import text
from jaxemb.models.lexinvariant import LanguageModelTask
from jaxemb.train import NonFiniteLoss, Trainer, core_config
from jaxemb.train.metrics import read_metrics
from helpers import ArraySource, Regression, regression_data


def _cfg(**train):
    c = core_config()
    c.train.update(steps=4, batch_size=16, log_every=1, checkpoint_every=0, progress=False)
    c.train.update(**train)
    c.optim.update(warmup_steps=0, lr=1e-2)
    return c


def _losses(workdir):
    return [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"), "train")]


def _lm_source(cfg, n_docs=40):
    docs = text.chunk_docs(text.pydoc_docs())[:n_docs]
    tok = text.ByteTokenizer()
    return text.PackedSource(text.pack([tok.encode(d) for d in docs], cfg.data.seq_len), cfg.train.batch_size, 1)


@pytest.mark.parametrize("kind", ["standard", "lexinvariant"])
def test_one_device_and_eight_devices_give_same_losses(tmp_path, kind):
    """Same 5 steps on 1 device and on a 2x2x2 (data, fsdp, tensor) mesh of 8 simulated devices."""
    assert jax.device_count() == 8
    losses = {}
    for name, shape, n in [("one", dict(data=1, fsdp=1, tensor=1), 1), ("eight", dict(data=2, fsdp=2, tensor=2), 8)]:
        cfg = get_config("tiny")
        cfg.model.kind = kind
        cfg.mesh.shape, cfg.mesh.num_devices = shape, n
        cfg.train.update(steps=5, log_every=1, checkpoint_every=0, eval_every=0, progress=False)
        trainer = Trainer(LanguageModelTask(cfg.model, cfg.data.seq_len), cfg, str(tmp_path / name))
        state = trainer.fit(_lm_source(cfg)).state
        if name == "eight":  # parameters really are sharded over fsdp and tensor
            w = state["params"]["params"]["block_0"]["mlp"]["wi"]["kernel"]
            assert w.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
            assert len({d for d in w.sharding.device_set}) == 8
        losses[name] = _losses(str(tmp_path / name))
    assert len(losses["one"]) == 5
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-5)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    data = regression_data()
    finals = {}
    for accum in (1, 4):
        cfg = _cfg(accum_steps=accum)
        cfg.mesh.shape = dict(data=2, fsdp=2, tensor=2)
        tr = Trainer(Regression(), cfg, str(tmp_path / f"a{accum}"))
        finals[accum] = np.asarray(tr.fit(ArraySource(data, 16)).state["params"]["w"])
    np.testing.assert_allclose(finals[4], finals[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["adamw", "adafactor"])
def test_optimizer_state_follows_parameter_sharding(tmp_path, opt):
    cfg = _cfg()
    cfg.optim.name = opt
    cfg.mesh.shape = dict(data=2, fsdp=4, tensor=1)
    tr = Trainer(Regression(dim=16, out=8), cfg, str(tmp_path))
    state = tr.fit(ArraySource(regression_data(), 16)).state
    spec = state["params"]["w"].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    if opt == "adamw":
        mu = state["opt_state"][1][0].mu["w"]
        assert mu.sharding.spec == spec
    assert np.isfinite(_losses(str(tmp_path))).all()


def test_bf16_compute_keeps_fp32_params(tmp_path):
    cfg = get_config("tiny")
    cfg.train.update(steps=3, compute_dtype="bfloat16", checkpoint_every=0, eval_every=0, progress=False, log_every=1)
    tr = Trainer(LanguageModelTask(cfg.model, cfg.data.seq_len), cfg, str(tmp_path))
    state = tr.fit(_lm_source(cfg)).state
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))
    assert np.isfinite(_losses(str(tmp_path))).all()


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    data = regression_data()
    data["x"][3 * 16 + 5, 0] = np.nan  # batch index 3 -> the 4th step
    cfg = _cfg(steps=8, checkpoint_every=2, async_checkpoints=False)
    tr = Trainer(Regression(), cfg, str(tmp_path))
    with pytest.raises(NonFiniteLoss, match=r"step 4.*last good checkpoint is step 2"):
        tr.fit(ArraySource(data, 16))
    steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
    assert steps == [2]


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    cfg = _cfg(batch_size=12)
    cfg.mesh.shape = dict(data=8, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        Trainer(Regression(), cfg, str(tmp_path))


def test_resume_finished_run_does_no_more_steps(tmp_path):
    cfg = _cfg(steps=4, checkpoint_every=2)
    src = ArraySource(regression_data(), 16)
    w1 = np.asarray(Trainer(Regression(), cfg, str(tmp_path)).fit(src).state["params"]["w"])
    w2 = np.asarray(Trainer(Regression(), cfg, str(tmp_path)).fit(src).state["params"]["w"])
    np.testing.assert_array_equal(w1, w2)
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"), "train")] == [1, 2, 3, 4]


def test_evaluation_is_logged(tmp_path):
    cfg = _cfg(steps=4, eval_every=2, eval_batches=2)
    Trainer(Regression(), cfg, str(tmp_path)).fit(ArraySource(regression_data(), 16),
                                                  ArraySource(regression_data(seed=1), 16))
    ev = read_metrics(str(tmp_path / "metrics.jsonl"), "eval")
    assert [r["step"] for r in ev] == [2, 4] and all(np.isfinite(r["loss"]) for r in ev)
    json.dumps(ev)


def test_eval_fn_and_best_checkpoint(tmp_path):
    cfg = _cfg(steps=6, eval_every=2, checkpoint_every=2, best_metric="score", best_mode="max")
    scores = iter([0.5, 0.9, 0.7])
    tr = Trainer(Regression(), cfg, str(tmp_path))
    state = tr.fit(ArraySource(regression_data(), 16), eval_fn=lambda st: {"score": next(scores)}).state
    best, meta = tr.restore_best(state)
    assert meta == {"step": 4, "value": 0.9, "metric": "score"}
    assert int(best["step"]) == 4
    ev = read_metrics(str(tmp_path / "metrics.jsonl"), "eval")
    assert [r["score"] for r in ev] == [0.5, 0.9, 0.7]


def test_exponential_schedule_decays_per_epoch():
    from jaxemb.train.optim import make_schedule
    c = core_config().optim
    c.update(schedule="exponential", lr=0.01, decay_steps=10, decay_rate=0.9, warmup_steps=0)
    s = make_schedule(c, 100)
    np.testing.assert_allclose([float(s(i)) for i in (0, 9, 10, 25)], [0.01, 0.01, 0.009, 0.0081], rtol=1e-6)


@pytest.mark.parametrize("guard", [True, False])
def test_guard_nonfinite_keeps_state_of_a_bad_step(tmp_path, guard):
    data = regression_data()
    data["x"][:16, 0] = np.nan  # the first batch
    cfg = _cfg(steps=2, guard_nonfinite=guard)
    tr = Trainer(Regression(), cfg, str(tmp_path))
    src = ArraySource(data, 16)
    state = tr.init_state(tr.put_batch(src, 0))
    before = jax.device_get(state["params"])
    state, metrics = tr.train_step(state, tr.put_batch(src, 0))
    after = jax.device_get(state["params"])
    assert not np.isfinite(float(metrics["loss"]))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert same == guard
    assert int(state["step"]) == 1


class _RegressionWithFrozenBias(Regression):
    """Regression plus a bias `b` that is frozen (it has a gradient, but no updates)."""

    def init(self, rng, batch):
        return dict(super().init(rng, batch), b=jax.numpy.ones((self.out,)))

    def loss(self, params, batch, rng):
        loss = jax.numpy.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)
        return loss, {"mse": loss}

    def frozen(self, path):
        return path[-1] == "b"


@pytest.mark.parametrize("clip", [0.05, 1e6, 0.0])
def test_clipped_step_matches_float64_reference(tmp_path, clip):
    """One SGD step clips by the global norm of the trained parameters' gradients (the frozen bias left out),
    and that norm is the logged grad_norm; checked against numpy float64 on fresh data each run."""
    seed = int(np.random.default_rng().integers(1 << 30))
    data = regression_data(seed=seed)
    cfg = _cfg(steps=1)
    cfg.optim.update(name="sgd", b1=0.0, lr=0.1, schedule="constant", clip_norm=clip)
    tr = Trainer(_RegressionWithFrozenBias(), cfg, str(tmp_path))
    src = ArraySource(data, 16)
    batch = tr.put_batch(src, 0)
    state = tr.init_state(batch)
    w0 = np.asarray(jax.device_get(state["params"]["w"]), np.float64)
    state, metrics = tr.train_step(state, batch)
    x, y = (np.asarray(v, np.float64) for v in (src.get(0)["x"], src.get(0)["y"]))
    g = 2.0 * x.T @ (x @ w0 + 1.0 - y) / y.size
    norm = np.sqrt(np.sum(g * g))
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    assert (scale < 1.0) == (clip == 0.05)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    np.testing.assert_allclose(jax.device_get(state["params"]["w"]), w0 - 0.1 * scale * g, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(jax.device_get(state["params"]["b"]), np.ones(8))
