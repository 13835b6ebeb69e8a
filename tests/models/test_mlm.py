import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.data import proteins
from jaxemb.models import mlm
from jaxemb.models.esm2 import Esm2Config
from jaxemb.train.constants import unbox

CFG = Esm2Config(d_model=16, num_layers=2, num_heads=2, mlp_dim=32, token_dropout=False)


def random_chains(rng, n, lo=3, hi=20):
    letters = np.array(list("LAGVSERTIDPKQNFYMHWC"))
    return ["".join(rng.choice(letters, rng.integers(lo, hi))) for _ in range(n)]


def test_masking_statistics_and_never_special_tokens():
    rows = mlm.pack_chains(random_chains(np.random.default_rng(0), 3000), 64)
    tokens = jnp.asarray(rows["tokens"])
    inputs, sel = jax.jit(mlm.mask_tokens)(jax.random.key(1), tokens)
    tokens, inputs, sel = map(np.asarray, (tokens, inputs, sel))
    residue = mlm.maskable(tokens)
    assert not sel[~residue].any() and (inputs[~residue] == tokens[~residue]).all()  # specials untouched
    assert (inputs[~sel] == tokens[~sel]).all()
    n = residue.sum()
    assert abs(sel.sum() / n - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n)
    s = sel.sum()
    masked = inputs[sel] == proteins.MASK
    changed = ~masked & (inputs[sel] != tokens[sel])
    kept = inputs[sel] == tokens[sel]
    assert abs(masked.mean() - 0.8) < 4 * np.sqrt(0.16 / s)
    # a random residue equals the original 1/20 of the time: 10% random -> 9.5% changed, 10.5% kept
    assert abs(changed.mean() - 0.095) < 4 * np.sqrt(0.095 * 0.905 / s)
    assert abs(kept.mean() - 0.105) < 4 * np.sqrt(0.105 * 0.895 / s)
    assert np.isin(inputs[sel][changed], mlm.STANDARD).all()


def _reference_loss(logits, tokens, selected, seg, weights):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    w = selected * (seg > 0) * weights[:, None]
    return (nll * w).sum() / w.sum(), ((logits.argmax(-1) == tokens) * w).sum() / w.sum()


def test_loss_only_on_masked_positions_matches_float64_reference():
    rng = np.random.default_rng(2)
    rows = mlm.pack_chains(random_chains(rng, 40), 32)
    batch = {"tokens": jnp.asarray(rows["tokens"][:6]), "segment_ids": jnp.asarray(rows["segment_ids"][:6]),
             "weights": jnp.asarray(np.array([1, 1, 1, 1, 1, 0], np.float32))}
    task = mlm.MLMTask(CFG, 32)
    params = unbox(jax.jit(task.init)(jax.random.key(0), batch))
    key = jax.random.key(3)
    loss, metrics = jax.jit(task.loss)(params, batch, key)
    inputs, sel = mlm.mask_tokens(key, batch["tokens"])
    logits = jax.jit(task.logits)(params, inputs, batch["segment_ids"])
    args = (np.asarray(batch["tokens"]), np.asarray(sel), np.asarray(batch["segment_ids"]), np.asarray(batch["weights"]))
    ref_loss, ref_acc = _reference_loss(logits, *args)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), ref_acc, rtol=1e-6)
    ev = jax.jit(task.eval_step)(params, batch, key)
    np.testing.assert_allclose(float(ev["loss"][0] / ev["loss"][1]), ref_loss, rtol=1e-5)
    # the loss over every real residue differs, so a loss that ignored the masking would fail above
    all_pos = _reference_loss(logits, args[0], mlm.maskable(args[0]), *args[2:])[0]
    assert abs(all_pos - ref_loss) > 1e-4


def test_packed_chain_outputs_do_not_depend_on_neighbours():
    task = mlm.MLMTask(CFG, 24)
    a, b1, b2 = "MKTAYIAKQR", "GSHMLE", "WWCCPPNN"
    r1, r2 = mlm.pack_chains([a, b1], 24), mlm.pack_chains([a, b2], 24)
    assert r1["tokens"].shape == (1, 24) and list(r1["segment_ids"][0, :12]) == [1] * 12
    assert r1["segment_ids"][0, 12] == 2 and r1["segment_ids"][0, -1] == 0
    params = unbox(jax.jit(task.init)(jax.random.key(0), {"tokens": jnp.asarray(r1["tokens"]),
                                                 "segment_ids": jnp.asarray(r1["segment_ids"])}))
    logits = jax.jit(task.logits)
    out1 = logits(params, jnp.asarray(r1["tokens"]), jnp.asarray(r1["segment_ids"]))
    out2 = logits(params, jnp.asarray(r2["tokens"]), jnp.asarray(r2["segment_ids"]))
    alone = mlm.pack_chains([a], 12)
    out3 = logits(params, jnp.asarray(alone["tokens"]), jnp.asarray(alone["segment_ids"]))
    np.testing.assert_allclose(out1[0, :12], out2[0, :12], atol=1e-5)
    np.testing.assert_allclose(out1[0, :12], out3[0], atol=1e-5)
    assert np.abs(out1[0, 12:18] - out2[0, 12:18]).max() > 1e-3  # the neighbour itself did change


def test_pack_cuts_long_chains_and_split_keeps_groups_apart():
    rows = mlm.pack_chains(["A" * 25, "GG"], 12)
    assert rows["chains_cut"] == 1 and (rows["tokens"] == proteins.CLS).sum() == 4
    assert mlm.maskable(rows["tokens"]).sum() == 27
    recs = [(f"P{i}", s) for i, s in enumerate(random_chains(np.random.default_rng(4), 200))] + [("P0", "MKV"), ("P1", "MKV")]
    train, valid = mlm.split_chains(recs, 0.3, seed=0)
    assert not set(train) & set(valid) and len(set(train) | set(valid)) == len({s for _, s in recs})
    assert 0.15 < len(valid) / (len(train) + len(valid)) < 0.45
    assert (train, valid) == mlm.split_chains(list(reversed(recs)), 0.3, seed=0)
    with pytest.raises(ValueError, match="valid_fraction"):
        mlm.split_chains(recs, 1.0)
    with pytest.raises(ValueError, match="chain 1"):
        mlm.pack_chains(["MK", ""], 12)


def test_readers_give_clear_errors(tmp_path):
    fa = tmp_path / "x.fasta"
    fa.write_text(">1A22_A desc\nMKT\nAYI\n\n>1A22_B\nGSHM\n")
    assert proteins.read_fasta(str(fa)) == [("1A22_A", "MKTAYI"), ("1A22_B", "GSHM")]
    fa.write_text("MKT\n>a\nMK\n")
    with pytest.raises(ValueError, match="line 1 holds sequence text before any '>' header"):
        proteins.read_fasta(str(fa))
    fa.write_text(">a\n>b\nMK\n")
    with pytest.raises(ValueError, match="record 'a'.*has no sequence"):
        proteins.read_fasta(str(fa))
    csv = tmp_path / "x.csv"
    csv.write_text('PDB,Ligand Sequences,Receptor Sequences\n1A22,"MKT,GSH",AYI\n')
    assert proteins.read_chains_csv(str(csv)) == [("1A22", "MKT"), ("1A22", "GSH"), ("1A22", "AYI")]
    csv.write_text("PDB,Ligand Sequences\n1A22,MKT\n")
    with pytest.raises(ValueError, match="no column 'Receptor Sequences'"):
        proteins.read_chains_csv(str(csv))
