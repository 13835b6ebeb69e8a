import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxemb.models.nfe import PARTS, KGETask

N, R, D, B = 13, 6, 5, 7


def softplus(x):
    return np.logaddexp(0.0, x)


def direct(model, h, r, t, gamma):
    """One triple's score in float64, written from the definitions (no expanded squares)."""
    if model in ("nfe1", "nfe2", "nfe3", "nfe_mu"):
        r_mu, r_s = np.split(r, 2)
        hp, tp = np.split(h, PARTS[model][0]), np.split(t, PARTS[model][0])
        mu1 = r_s * hp[0] + r_mu
        if model == "nfe1":
            return gamma - (np.sum((mu1 - tp[0]) ** 2) + np.sum((np.abs(r_s * hp[1]) - np.abs(tp[1])) ** 2))
        if model == "nfe_mu":
            return gamma - np.sum((mu1 - tp[0]) ** 2)
        if model == "nfe2":
            d_mu = mu1 - tp[0]
            d_a = np.abs(r_s * hp[1]) - np.abs(tp[1])
            d_b = np.abs(r_s * hp[2]) - np.abs(tp[2])
            return gamma - (d_mu @ d_mu + d_a @ d_a / 2 + d_b @ d_b / 2 + np.sqrt(2 / np.pi) * d_mu @ (d_b - d_a))
        s1, s2 = softplus(r_s) * softplus(hp[1]), softplus(tp[1])
        kl = np.sum(np.log(s2 / s1) + (s1 ** 2 + (mu1 - tp[0]) ** 2) / (2 * s2 ** 2) - 0.5)
        return gamma - kl
    if model == "nfe_sigma":
        return gamma - np.sum((np.abs(r * h) - np.abs(t)) ** 2)
    if model == "transe":
        return gamma - np.sum((h + r - t) ** 2)
    if model == "distmult":
        return np.sum(h * r * t)
    if model == "complex":
        c = lambda x: x[:len(x) // 2] + 1j * x[len(x) // 2:]
        return np.real(np.sum(c(h) * c(r) * np.conj(c(t))))
    raise AssertionError(model)


def make(model, loss="logistic", n3=0.0, pad=1, seed=0):
    cfg = ml_collections.ConfigDict(dict(name=model, dim=D, gamma=2.5, init_scale=0.6, loss=loss, n3=n3,
                                         ties="mean"))
    task = KGETask(cfg, N, R, pad_multiple=pad)
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x,
                          task.init(jax.random.key(seed), None), is_leaf=lambda x: hasattr(x, "unbox"))
    rng = np.random.default_rng(seed)
    batch = {"head": rng.integers(0, N, B).astype(np.int32), "rel": rng.integers(0, R, B).astype(np.int32),
             "tail": rng.integers(0, N, B).astype(np.int32),
             "weights": np.array([1] * (B - 2) + [0, 0], np.float32)}
    return task, params, batch


def flat(table):
    """Parts (a tuple of (n, d) or an array (P, n, d)) -> (n, P * d) float64 rows [part 0 | part 1 | ...]."""
    t = np.asarray(np.stack(table) if isinstance(table, (tuple, list)) else table, np.float64)
    return t.transpose(1, 0, 2).reshape(t.shape[1], -1)


def reference_scores(model, params, batch, gamma=2.5):
    ent, rel = (flat(params[k]) for k in ("entity", "relation"))
    return np.array([[direct(model, ent[h], rel[r], ent[t], gamma) for t in range(N)]
                     for h, r in zip(batch["head"], batch["rel"])])


@pytest.mark.parametrize("model", list(PARTS))
def test_scores_match_direct_float64_formula(model):
    task, params, batch = make(model)
    got = np.asarray(task.scores(params, batch["head"], batch["rel"]))
    want = reference_scores(model, params, batch)
    assert got.shape == (B, N) and np.std(want) > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    assert [x.shape for x in params["entity"]] == [(N, D)] * PARTS[model][0]
    assert float(np.abs(np.stack(params["entity"])).max()) <= 0.6


@pytest.mark.parametrize("model", ["nfe1", "nfe2", "nfe3", "complex"])
def test_no_batch_by_entities_by_dim_tensor(model):
    task, params, batch = make(model)
    jaxpr = jax.make_jaxpr(task.loss)(params, batch, jax.random.key(0))

    def shapes(jx):
        for eqn in jx.eqns:
            for v in eqn.outvars:
                yield getattr(v.aval, "shape", ())
            for p in eqn.params.values():  # nested jaxprs (jit, custom_jvp, ...)
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    yield from shapes(inner)

    found = list(shapes(jaxpr.jaxpr))
    assert (B, N) in found  # the walk sees the score matrix ...
    assert not [s for s in found if len(s) >= 3 and B in s and N in s]  # ... and nothing (B, N, d)-shaped


@pytest.mark.parametrize("loss", ["logistic", "softmax"])
def test_loss_matches_direct_formula_and_ignores_padding(loss):
    task, params, batch = make("nfe2", loss=loss)
    got, metrics = task.loss(params, batch, jax.random.key(0))
    s = reference_scores("nfe2", params, batch)
    y = np.eye(N)[batch["tail"]]
    if loss == "logistic":
        per = np.sum(softplus((1 - 2 * y) * s), 1)
    else:
        per = np.log(np.sum(np.exp(s), 1)) - s[np.arange(B), batch["tail"]]
    want = np.sum(per * batch["weights"]) / batch["weights"].sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(metrics["n3"]) == 0.0


def test_complex_n3_regulariser():
    task, params, batch = make("complex", loss="softmax", n3=0.01)
    _, metrics = task.loss(params, batch, jax.random.key(0))
    ent, rel = (flat(params[k]) for k in ("entity", "relation"))
    mod = lambda x: np.abs(x[..., :D] + 1j * x[..., D:]) ** 3
    per = mod(ent[batch["head"]]).sum(1) + mod(rel[batch["rel"]]).sum(1) + mod(ent[batch["tail"]]).sum(1)
    want = 0.01 * np.sum(per * batch["weights"]) / batch["weights"].sum()
    np.testing.assert_allclose(float(metrics["n3"]), want, rtol=1e-5)


def test_padded_entity_rows_never_score():
    task, params, batch = make("nfe1", pad=8)
    assert task.table_rows == 16 and params["entity"][0].shape[0] == 16
    s = np.asarray(task.scores(params, batch["head"], batch["rel"]))
    trimmed = dict(params, entity=tuple(x[:N] for x in params["entity"]))
    np.testing.assert_allclose(s[:, :N], reference_scores("nfe1", trimmed, batch), rtol=1e-5, atol=2e-5)
    assert (s[:, N:] == -1e30).all()
    grads = jax.grad(lambda p: task.loss(p, batch, None)[0])(params)
    assert not any(np.asarray(x[N:]).any() for x in grads["entity"])
    ranks = task.rank_step(params, dict(batch, filter=-np.ones((B, 8), np.int32)), None)
    assert float(jnp.max(ranks)) <= N


def test_unknown_model_and_loss_are_clear_errors():
    cfg = ml_collections.ConfigDict(dict(name="rotate", dim=4, gamma=0.0, init_scale=0.1, loss="logistic",
                                         n3=0.0, ties="mean"))
    with pytest.raises(ValueError, match="model.name='rotate'; expected one of nfe1"):
        KGETask(cfg, N, R)
    cfg.name, cfg.loss = "nfe1", "hinge"
    with pytest.raises(ValueError, match="model.loss='hinge'"):
        KGETask(cfg, N, R)


@pytest.mark.parametrize("model,loss", [("nfe1", "logistic"), ("nfe3", "logistic"), ("complex", "softmax")])
def test_one_vs_all_backward_matches_autodiff_float64(model, loss):
    """The hand-written backward of one_vs_all_loss equals jax.grad of the plain formula, in float64, with
    padded entity rows and zero-weight queries; fresh random parameters each run."""
    seed = int(np.random.default_rng().integers(1 << 30))
    with jax.enable_x64(True):
        task, params, batch = make(model, loss=loss, pad=8, seed=seed)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)

        def plain(p):
            s = task.scores(p, batch["head"], batch["rel"])[:, :N]
            y = jax.nn.one_hot(batch["tail"], N, dtype=s.dtype)
            if loss == "logistic":
                per = jnp.sum(jax.nn.softplus((1 - 2 * y) * s), 1)
            else:
                per = jax.nn.logsumexp(s, 1) - jnp.sum(y * s, 1)
            w = jnp.asarray(batch["weights"], s.dtype)
            return jnp.sum(w * per) / jnp.sum(w)

        got = jax.grad(lambda p: task.loss(p, batch, None)[0])(params)
        want = jax.grad(plain)(params)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
        assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(got)) > 1e-3
