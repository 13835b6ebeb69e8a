"""The Task contract v2: constants, pretrained subtrees, frozen parameters, exact evaluation, FitResult."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxemb.train import FitResult, Pretrained, Trainer, core_config, logical, save_tree
from helpers import ArraySource, Regression, regression_data


def _cfg(steps=3, **train):
    c = core_config()
    c.train.update(dict(dict(steps=steps, batch_size=16, log_every=1, checkpoint_every=0, progress=False), **train))
    c.optim.update(warmup_steps=0, lr=1e-2, schedule="constant")
    return c


class _WithConstant(Regression):
    """pred = x @ w + x @ M with M a constant (16, 8) sharded ('embed', 'mlp')."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def constants(self):
        return {"m": logical(self.m, ("embed", "mlp"))}

    def loss(self, params, batch, rng, constants):
        pred = batch["x"] @ (params["w"] + constants["m"])
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"mse": loss}


class _WithFrozenM(Regression):
    """The same model with M as a frozen parameter (the reference for the constant)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def init(self, rng, batch):
        return dict(super().init(rng, batch), m=jnp.asarray(self.m))

    def frozen(self, path):
        return path[-1] == "m"

    def loss(self, params, batch, rng):
        pred = batch["x"] @ (params["w"] + params["m"])
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"mse": loss}


def test_constants_are_sharded_outside_the_state_and_train_like_a_frozen_parameter(tmp_path):
    m = np.random.default_rng().normal(size=(16, 8)).astype(np.float32)
    data = regression_data(seed=int(np.random.default_rng().integers(1 << 20)))
    cfg = _cfg(checkpoint_every=1)
    cfg.mesh.shape = dict(data=2, fsdp=2, tensor=2)
    tr = Trainer(_WithConstant(m), cfg, str(tmp_path / "c"))
    res = tr.fit(ArraySource(data, 16))
    assert isinstance(res, FitResult) and res.steps == 3 and res.train_seconds > 0
    assert set(res.state["params"]) == {"w"}
    n_opt = sum(x.size for x in jax.tree.leaves(res.state["opt_state"]))
    assert n_opt < 2 * 16 * 8 + 16  # Adam moments of w only, none for M
    c = tr.constants["m"]
    np.testing.assert_array_equal(np.asarray(c), m)
    assert c.sharding.spec == P("fsdp", "tensor") and len(c.sharding.device_set) == 8
    # nothing of M in the checkpoints: their leaves are the state's (w, its Adam moments, counters)
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "c" / "checkpoints")
                     for f in fs)
    ref_cfg = _cfg(checkpoint_every=1)
    ref = Trainer(_WithFrozenM(m), ref_cfg, str(tmp_path / "f")).fit(ArraySource(data, 16))
    np.testing.assert_allclose(np.asarray(res.state["params"]["w"]), np.asarray(ref.state["params"]["w"]),
                               rtol=1e-6, atol=1e-7)
    assert res.train_metrics["grad_norm"] == pytest.approx(ref.train_metrics["grad_norm"], rel=1e-5)
    ref_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "f" / "checkpoints")
                    for f in fs)
    assert ckpt_bytes < ref_bytes  # the frozen-parameter version saves M; the constant version does not


def test_frozen_parameters_get_no_gradient_from_the_core(tmp_path):
    m = np.ones((16, 8), np.float32)
    tr = Trainer(_WithFrozenM(m), _cfg(), str(tmp_path))
    src = ArraySource(regression_data(), 16)
    state = tr.init_state(tr.put_batch(src, 0))
    grads = jax.grad(lambda p: tr._loss_fn(p, src.get(0), jax.random.key(0), {})[0])(state["params"])
    assert not np.asarray(grads["m"]).any() and np.asarray(grads["w"]).any()


class _Pretrained(Regression):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def init(self, rng, batch):
        return {"w": super().init(rng, batch)["w"], "enc": {"k": jnp.zeros((4, 3))}}

    def pretrained(self):
        return {"enc": self.path}

    def loss(self, params, batch, rng):
        return super().loss(params, batch, rng)[0] + jnp.sum(params["enc"]["k"]) * 0.0, {}


def test_pretrained_subtree_is_loaded_and_bad_checkpoints_are_named(tmp_path):
    k = np.random.default_rng().normal(size=(4, 3)).astype(np.float32)
    good = save_tree(str(tmp_path / "good"), {"k": k})
    tr = Trainer(_Pretrained(good), _cfg(), str(tmp_path / "run"))
    src = ArraySource(regression_data(), 16)
    state = tr.init_state(tr.put_batch(src, 0))
    np.testing.assert_array_equal(np.asarray(state["params"]["enc"]["k"]), k)
    for name, tree, msg in [("shape", {"k": k[:2]}, r"leaf 'k' has shape \(2, 3\), expected \(4, 3\)"),
                            ("missing", {"j": k}, "leaf 'k' is missing"),
                            ("extra", {"k": k, "z": k}, "unexpected leaves z")]:
        bad = save_tree(str(tmp_path / name), tree)
        tr = Trainer(_Pretrained(bad), _cfg(), str(tmp_path / f"run-{name}"))
        with pytest.raises(ValueError, match=msg):
            tr.init_state(tr.put_batch(src, 0))
    tr = Trainer(_Pretrained(str(tmp_path / "nowhere")), _cfg(), str(tmp_path / "run-none"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tr.init_state(tr.put_batch(src, 0))


def test_pretrained_constant_is_read_from_disk_sharded(tmp_path):
    m = np.random.default_rng().normal(size=(16, 8)).astype(np.float32)
    path = save_tree(str(tmp_path / "m"), {"m": m})
    like = {"m": logical(jax.ShapeDtypeStruct((16, 8), jnp.float32), ("embed", "mlp"))}

    class FromDisk(_WithConstant):
        def constants(self):
            return {"pre": Pretrained(path, like)}

        def loss(self, params, batch, rng, constants):
            return super().loss(params, batch, rng, {"m": constants["pre"]["m"]})

    cfg = _cfg()
    cfg.mesh.shape = dict(data=2, fsdp=4, tensor=1)
    tr = Trainer(FromDisk(m), cfg, str(tmp_path / "run"))
    got = tr.constants["pre"]["m"]
    np.testing.assert_array_equal(np.asarray(got), m)
    assert got.sharding.spec[0] == "fsdp" and got.addressable_shards[0].data.shape == (4, 8)
    assert np.isfinite(tr.fit(ArraySource(regression_data(), 16)).train_metrics["loss"])


class _Ragged:
    """Eval batches of unequal weight: 16 rows of which the last batch's padding rows have weight 0."""
    batch_size = 16

    def __init__(self, x, w):
        self.x, self.w = x, w

    def get(self, index, rows=slice(None)):
        sl = slice(index * 16, (index + 1) * 16)
        return {"x": self.x[sl][rows], "y": np.zeros_like(self.x[sl][rows]), "weights": self.w[sl][rows]}


class _MeanTask:
    def init(self, rng, batch):
        return {"b": jnp.zeros(())}

    def loss(self, params, batch, rng):
        v = jnp.sum(batch["x"], -1) + params["b"]
        w = batch["weights"]
        return jnp.sum(v * w) / jnp.maximum(jnp.sum(w), 1.0), {"sq": jnp.sum(v * v * w) / jnp.maximum(jnp.sum(w), 1.0)}


def test_evaluation_is_the_exact_mean_over_ragged_batches(tmp_path):
    rng = np.random.default_rng()
    n = 16 * 3
    x = rng.normal(size=(n, 4)).astype(np.float32)
    w = (rng.random(n) < 0.7).astype(np.float32)
    w[-9:] = 0.0  # a ragged last batch padded with weight-0 rows
    w[0] = 3.0  # and an example counted three times
    tr = Trainer(_MeanTask(), _cfg(), str(tmp_path))
    src = _Ragged(x, w)
    state = tr.init_state(tr.put_batch(src, 0))
    got = tr.evaluate(state["params"], src, 3)
    v = x.astype(np.float64).sum(-1)
    scale = np.sum(np.abs(v) * w) / np.sum(w)  # float32 batch sums: error relative to the terms, not the mean
    np.testing.assert_allclose(got["loss"], np.sum(v * w) / np.sum(w), rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(got["sq"], np.sum(v * v * w) / np.sum(w), rtol=1e-6)
    per_batch = np.mean([np.sum((v * w)[i * 16:(i + 1) * 16]) / np.sum(w[i * 16:(i + 1) * 16]) for i in range(3)])
    assert abs(per_batch - got["loss"]) > 1e-4  # the mean of batch means would be biased here


def test_task_eval_step_sums_and_weights_are_divided_once(tmp_path):
    class Counting(_MeanTask):
        def eval_step(self, params, batch, rng):
            return {"pos": (jnp.sum((batch["x"][:, 0] > 0) * batch["weights"]), jnp.sum(batch["weights"])),
                    "none": (jnp.float32(0.0), jnp.float32(0.0))}

    rng = np.random.default_rng()
    x = rng.normal(size=(32, 4)).astype(np.float32)
    w = rng.integers(0, 3, 32).astype(np.float32)
    tr = Trainer(Counting(), _cfg(), str(tmp_path))
    src = _Ragged(x, w)
    got = tr.evaluate(tr.init_state(tr.put_batch(src, 0))["params"], src, 2)
    np.testing.assert_allclose(got["pos"], np.sum((x[:, 0] > 0) * w) / np.sum(w), rtol=1e-6)
    assert np.isnan(got["none"])


def test_fit_result_reports_last_eval_metrics(tmp_path):
    cfg = _cfg(steps=4, eval_every=2, eval_batches=2)
    res = Trainer(Regression(), cfg, str(tmp_path)).fit(ArraySource(regression_data(), 16),
                                                        ArraySource(regression_data(seed=1), 16))
    assert set(res.eval_metrics) >= {"loss", "mse"} and res.steps == 4
    assert res.train_metrics["loss"] > 0 and not hasattr(res, "__getitem__")


def test_task_decay_limits_weight_decay_to_the_parameters_it_names(tmp_path):
    class NoDecayBias:
        def init(self, rng, batch):
            return {"w": jnp.ones((3,)), "b": jnp.ones((3,))}

        def loss(self, params, batch, rng):  # no gradient: only weight decay moves the parameters
            return 0.0 * jnp.sum(params["w"] + params["b"]) + jnp.mean(batch["x"]) * 0.0, {}

        def decay(self, path):
            return path[-1] != "b"

    cfg = _cfg(steps=2)
    cfg.optim.update(name="adamw", lr=0.1, weight_decay=0.5, clip_norm=0.0)
    res = Trainer(NoDecayBias(), cfg, str(tmp_path)).fit(ArraySource(regression_data(), 16))
    np.testing.assert_allclose(np.asarray(res.state["params"]["w"]), (1 - 0.1 * 0.5) ** 2, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(res.state["params"]["b"]), 1.0)
