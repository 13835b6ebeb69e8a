import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import readout_memory as rm
from jaxemb.nn.lexinvariant_vectors import sequence_tables


def _inputs(rng, b, length, dim, vocab):
    h = jnp.asarray(rng.normal(size=(b, length, dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, size=(b, length)), jnp.int32)
    return h, jax.random.key(int(rng.integers(1 << 30))), targets


def test_blockwise_compiled_memory_is_far_below_materialised():
    b, length, dim, vocab, block = 2, 16, 32, 4096, 256
    args = _inputs(np.random.default_rng(), b, length, dim, vocab)
    scale = dim ** -0.5
    _, mat = rm.compile_stats(functools.partial(rm.materialised_loss, vocab=vocab, scale=scale), args)
    _, blk = rm.compile_stats(functools.partial(rm.blockwise_loss, vocab=vocab, block=block, scale=scale), args)
    table_bytes = 4 * b * vocab * dim  # 1 MiB
    assert mat["temp_bytes"] >= table_bytes  # the materialised side must hold the table
    # fails if blockwise_nll (or its backward) ever builds the (B, V, d) table or the (B, L, V) logits
    assert blk["temp_bytes"] < 0.5 * mat["temp_bytes"]
    assert blk["temp_bytes"] < table_bytes
    assert blk["temp_bytes"] < 4 * b * length * vocab


def test_benchmark_losses_match_float64_reference():
    rng = np.random.default_rng()
    b, length, dim, vocab, block = 2, 5, 8, 300, 64  # 300 ids: the last block is padded
    h, key, targets = _inputs(rng, b, length, dim, vocab)
    scale = dim ** -0.5
    table = np.asarray(jax.jit(sequence_tables, static_argnums=(1, 2, 3))(key, b, vocab, dim), np.float64)
    hd, t = np.asarray(h, np.float64), np.asarray(targets)
    logits = np.einsum("bld,bvd->blv", hd, table) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(vocab)[t]
    ref_loss = -np.log(np.take_along_axis(p, t[..., None], -1)).mean()
    ref_grad = np.einsum("blv,bvd->bld", p - onehot, table) * scale / (b * length)
    for loss in (functools.partial(rm.materialised_loss, vocab=vocab, scale=scale),
                 functools.partial(rm.blockwise_loss, vocab=vocab, block=block, scale=scale)):
        value, grad = jax.jit(jax.value_and_grad(loss))(h, key, targets)
        np.testing.assert_allclose(float(value), ref_loss, rtol=1e-5)  # float32 vs float64
        np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-6)


def test_main_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # BENCHMARKS.md, if ever written, lands here
    out = tmp_path / "bench" / "results.json"
    seed = int(np.random.default_rng().integers(1 << 20))
    # 64 ids in blocks of 24: three blocks, the last one padded
    result = rm.main(["--vocab", "64", "--dim", "8", "--seq", "4", "--batch", "1", "2", "--blocks", "24",
                      "--repeats", "1", "--seed", str(seed), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert (tmp_path / "bench" / "peak_memory.png").stat().st_size > 0
    assert not (tmp_path / "BENCHMARKS.md").exists()
    assert set(saved) == {"args", "machine", "rows"} and len(saved["rows"]) == 4 == len(result["rows"])
    for r in saved["rows"]:
        assert {"readout", "block", "batch", "temp_bytes", "peak_bytes", "table_bytes", "logits_bytes",
                "call_s", "loss_abs_diff", "grad_max_abs_diff"} <= set(r)
        assert r["call_s"] > 0
        if r["readout"] == "blockwise":
            assert r["loss_abs_diff"] < 1e-5 and r["grad_max_abs_diff"] < 1e-5  # float32 vs float32


@pytest.mark.parametrize("bad", [["--blocks", "0"], ["--vocab", "1"], ["--batch", "0"], ["--repeats", "0"]])
def test_bad_arguments_are_rejected(bad, capsys):
    with pytest.raises(SystemExit) as e:
        rm.parse(bad)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err
