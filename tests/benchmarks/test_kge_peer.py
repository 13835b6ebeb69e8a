"""The PyTorch NFE-1 peer (benchmarks/torch_peer_nfe.py) against jaxemb's NFE-1 loss and gradient in float64,
and the shared benchmark helpers (CPU model, oneDNN switch)."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import common
from jaxemb.models.nfe import KGETask

if os.environ.get("CI"):
    import torch  # CI installs the .[bench] extra: a missing PyTorch is a failure there
else:
    torch = pytest.importorskip("torch", reason="PyTorch (pip install -e '.[bench]') is not installed")


def _jax_loss_and_grads(params, batch, n_ent, n_rel, dim, gamma):
    cfg = ml_collections.ConfigDict(dict(name="nfe1", dim=dim, gamma=gamma, init_scale=0.1, loss="logistic",
                                         n3=0.0, ties="mean"))
    task = KGETask(cfg, n_ent, n_rel, pad_multiple=8)  # 8 > n_ent % 8: padded rows take part
    pad = task.table_rows - n_ent
    p = {"entity": tuple(jnp.pad(x, ((0, pad), (0, 0))) for x in params["entity"]), "relation": params["relation"]}
    (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(p, batch, None)
    return float(loss), g, pad


@pytest.mark.parametrize("padded_rows", [0, 3])
def test_torch_nfe1_matches_jaxemb_loss_and_gradient_in_float64(padded_rows):
    from benchmarks import torch_peer_nfe
    rng = np.random.default_rng(padded_rows)
    n_ent, n_rel, dim, gamma, b = 13, 6, 5, 1.5, 9
    ent = rng.uniform(-0.5, 0.5, size=(2, n_ent, dim))
    rel = rng.uniform(-0.5, 0.5, size=(2, n_rel, dim))
    head, r, tail = rng.integers(0, n_ent, b), rng.integers(0, n_rel, b), rng.integers(0, n_ent, b)
    weights = np.ones(b)
    weights[b - padded_rows:] = 0.0
    with jax.enable_x64(True):
        batch = {"head": jnp.asarray(head, jnp.int32), "rel": jnp.asarray(r, jnp.int32),
                 "tail": jnp.asarray(tail, jnp.int32), "weights": jnp.asarray(weights)}
        params = {"entity": tuple(jnp.asarray(x) for x in ent), "relation": jnp.asarray(rel)}
        want_loss, want, pad = _jax_loss_and_grads(params, batch, n_ent, n_rel, dim, gamma)
        want_ent = [np.asarray(x) for x in want["entity"]]
        want_rel = np.asarray(want["relation"])

    model = torch_peer_nfe.NFE1(n_ent, n_rel, dim, gamma, dtype=torch.float64)
    with torch.no_grad():
        model.entity.weight.copy_(torch.from_numpy(np.concatenate(ent, axis=1)))
        model.relation.weight.copy_(torch.from_numpy(np.concatenate(rel, axis=1)))
    keep = slice(0, b - padded_rows)  # the reference's short last batch
    loss = torch_peer_nfe.loss_fn(model(torch.from_numpy(head[keep]), torch.from_numpy(r[keep])),
                                  torch.from_numpy(tail[keep]))
    loss.backward()
    g_ent = model.entity.weight.grad.numpy()
    g_rel = model.relation.weight.grad.numpy()

    np.testing.assert_allclose(loss.item(), want_loss, rtol=1e-12)
    for part in range(2):
        np.testing.assert_allclose(g_ent[:, part * dim:(part + 1) * dim], want_ent[part][:n_ent], rtol=1e-9,
                                   atol=1e-12)
        assert not want_ent[part][n_ent:].any()  # padded entity rows get no gradient
        np.testing.assert_allclose(g_rel[:, part * dim:(part + 1) * dim], want_rel[part], rtol=1e-9, atol=1e-12)
    assert pad > 0 and np.abs(g_ent).max() > 0


def test_torch_nfe1_scores_are_the_expanded_squared_distances():
    from benchmarks import torch_peer_nfe
    torch.manual_seed(0)
    model = torch_peer_nfe.NFE1(7, 4, 3, 2.0, init_scale=0.5, dtype=torch.float64)
    h, r = torch.tensor([0, 6, 3]), torch.tensor([1, 3, 0])
    e, rr = model.entity.weight.detach().numpy(), model.relation.weight.detach().numpy()
    want = np.zeros((3, 7))
    for i in range(3):
        h_mu, h_s, r_mu, r_s = e[h[i], :3], e[h[i], 3:], rr[r[i], :3], rr[r[i], 3:]
        for j in range(7):
            want[i, j] = 2.0 - (np.sum((r_s * h_mu + r_mu - e[j, :3]) ** 2)
                                + np.sum((np.abs(r_s * h_s) - np.abs(e[j, 3:])) ** 2))
    np.testing.assert_allclose(model(h, r).detach().numpy(), want, rtol=1e-12)


def test_cpu_model_reads_lscpu_then_proc_cpuinfo(monkeypatch):
    class Out:
        stdout = "Architecture:  x86_64\nModel name:    Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"

    monkeypatch.setattr(common.subprocess, "run", lambda *a, **k: Out())
    assert common.cpu_model() == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"

    def missing(*a, **k):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(common.subprocess, "run", missing)
    name = common.cpu_model()
    if os.path.exists("/proc/cpuinfo") and "model name" in open("/proc/cpuinfo").read():
        assert name != "unknown CPU" and name == next(
            l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))


def test_set_onednn_replaces_only_its_own_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true --xla_force_host_platform_device_count=2")
    common.set_onednn("off")
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                               "--xla_cpu_use_onednn=false"]
    common.set_onednn("default")
    assert "--xla_cpu_use_onednn=false" in os.environ["XLA_FLAGS"]
    with pytest.raises(ValueError, match="onednn mode"):
        common.set_onednn("yes")


def test_strip_option_drops_both_spellings():
    assert common.strip_option(["--dim", "8", "--out", "a", "--out=b", "--steps", "2"], "--out") == \
        ["--dim", "8", "--steps", "2"]
