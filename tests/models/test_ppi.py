"""The EC / SC / HP / PAD heads against ppiseq's computation written in PyTorch (float64, same weights), and
their invariances."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxemb.models import ppi

D = 16


def rand(rng, *shape):
    return rng.normal(size=shape)


def lengths(rng, n, width):
    return rng.integers(1, width + 1, size=n)


def garbage_pad(x, lens, value=1e3):
    """x with its padding positions (beyond lens along axis 1) overwritten."""
    x = np.array(x)
    for i, n in enumerate(lens):
        x[i, n:] = value
    return x


def init(kind, inputs, **cfg):
    head = ppi.make_head(ppi.HeadConfig(kind=kind, **cfg))
    params = head.init(jax.random.key(np.random.randint(1 << 30)), **inputs)["params"]
    params = jax.tree.map(lambda v: np.asarray(getattr(v, "value", v), np.float64), params,
                          is_leaf=lambda v: hasattr(v, "value"))
    return head, params


def run(head, params, inputs):
    with jax.enable_x64(True):
        args = {k: jnp.asarray(v) for k, v in inputs.items()}
        return np.asarray(jax.jit(lambda p, a: head.apply({"params": p}, **a))(params, args))


# ---------------------------------------------------------------- ppiseq in PyTorch (float64)

def t(x):
    return torch.as_tensor(np.asarray(x, np.float64))


def t_pool(w, x, mask):
    """ppiseq AttentionPooling1D: softmax(x w^T + log mask) weighted sum."""
    s = (x @ t(w).T)[..., 0] + torch.log(mask)
    return (x * torch.softmax(s, -1)[..., None]).sum(1)


def t_dense(p, x):
    y = x @ t(p["kernel"])
    return y + t(p["bias"]) if "bias" in p else y


def t_mask(lens, width):
    return (torch.arange(width)[None, :] < torch.as_tensor(lens)[:, None]).double()


@torch.no_grad()
def t_mha(p, q, kv, key_mask):
    """torch.nn.MultiheadAttention(bias=False, batch_first=True) with ppiseq's float key mask log(mask)."""
    d = q.shape[-1]
    h = p["query"]["kernel"].shape[1]
    mha = torch.nn.MultiheadAttention(d, h, bias=False, batch_first=True).double()
    mha.in_proj_weight.copy_(torch.cat([t(p[n]["kernel"]).reshape(d, d).T for n in ("query", "key", "value")]))
    mha.out_proj.weight.copy_(t(p["out"]["kernel"]).reshape(d, d).T)
    return mha(q, kv, kv, key_padding_mask=torch.log(key_mask), need_weights=False)[0]


def ref_ec(p, lig, ll, rec, rl):
    x = torch.cat([t(lig), t(rec)], 1)                        # ppiseq: padded sides joined, masks too
    m = torch.cat([t_mask(ll, lig.shape[1]), t_mask(rl, rec.shape[1])], 1)
    h = torch.nn.functional.silu(t_dense(p["hidden"], t_pool(p["pool"]["weight"], x, m)))
    return t_dense(p["output"], h)[:, 0]


def ref_pad(p, lig, ll, rec, rl):
    xl, xr = t(lig), t(rec)
    ml, mr = t_mask(ll, lig.shape[1]), t_mask(rl, rec.shape[1])
    xl, xr = xl + t_mha(p["cross"], xl, xr, mr), xr + t_mha(p["cross"], xr, xl, ml)
    h = t_pool(p["pool"]["weight"], xl, ml) + t_pool(p["pool"]["weight"], xr, mr)
    h = t_dense(p["ffn_out"], torch.nn.functional.silu(t_dense(p["ffn_in"], h)))
    return t_dense(p["output"], h)[:, 0]


def ref_hp(p, chains):
    """chains: per complex (ligand chain arrays, receptor chain arrays); ppiseq pools each chain with a
    batch of one, then each side's chain vectors."""
    out = []
    for lig, rec in chains:
        sides = []
        for side in (lig, rec):
            vecs = torch.cat([t_pool(p["pool"]["weight"], t(c)[None], torch.ones(1, len(c)).double()) for c in side])
            sides.append(t_pool(p["chain_pool"]["weight"], vecs[None], torch.ones(1, len(side)).double()))
        h = torch.cat(sides, -1)
        h = t_dense(p["ffn_out"], torch.nn.functional.silu(t_dense(p["ffn_in"], h)))
        out.append(t_dense(p["output"], h)[:, 0])
    return torch.cat(out)


# ---------------------------------------------------------------- parity with the reference


def pair_inputs(rng, b=4, wl=9, wr=7):
    ll, rl = lengths(rng, b, wl), lengths(rng, b, wr)
    return dict(lig=garbage_pad(rand(rng, b, wl, D), ll), lig_len=ll, rec=garbage_pad(rand(rng, b, wr, D), rl),
                rec_len=rl)


@pytest.mark.parametrize("kind, ref", [("ec", ref_ec), ("pad", ref_pad)])
def test_pair_heads_match_ppiseq_in_float64(kind, ref):
    rng = np.random.default_rng()
    x = pair_inputs(rng)
    head, params = init(kind, x, cross_heads=4)
    want = ref(params, x["lig"], x["lig_len"], x["rec"], x["rec_len"]).numpy()
    np.testing.assert_allclose(run(head, params, x), want, rtol=1e-10, atol=1e-12)


def test_sc_head_matches_ppiseq_in_float64():
    rng = np.random.default_rng()
    n = lengths(rng, 5, 11)
    x = dict(x=garbage_pad(rand(rng, 5, 11, D), n), length=n)
    head, p = init("sc", x)
    want = t_dense(p["output"], t_pool(p["pool"]["weight"], t(x["x"]), t_mask(n, 11)))[:, 0].numpy()
    np.testing.assert_allclose(run(head, p, x), want, rtol=1e-10, atol=1e-12)


def hp_case(rng, b=3, width=6, slots=5):
    """Complexes of 1-3 ligand and 1-2 receptor chains as chain rows, packed rows, and plain lists."""
    chains, rows, rlen, packed, seg, nl, nr = [], [], [], [], [], [], []
    for _ in range(b):
        n_l, n_r = rng.integers(1, 4), rng.integers(1, 3)
        lig = [rand(rng, rng.integers(1, width + 1), D) for _ in range(n_l)]
        rec = [rand(rng, rng.integers(1, width + 1), D) for _ in range(n_r)]
        chains.append((lig, rec))
        nl.append(n_l)
        nr.append(n_r)
        r = np.full((slots, width, D), 7e2)
        lens = np.zeros(slots, np.int64)
        for j, c in enumerate(lig + rec):
            r[j, :len(c)], lens[j] = c, len(c)
        rows.append(r)
        rlen.append(lens)
        packed.append(np.concatenate(lig + rec))
        seg.append(np.concatenate([[j + 1] * len(c) for j, c in enumerate(lig + rec)]))
    wp = max(len(p) for p in packed) + 3
    packed = np.stack([np.concatenate([p, np.full((wp - len(p), D), -5e2)]) for p in packed])
    seg = np.stack([np.concatenate([s, np.zeros(wp - len(s), np.int64)]) for s in seg])
    common = dict(n_lig=np.array(nl), n_rec=np.array(nr))
    return chains, dict(common, chains=np.stack(rows), chain_len=np.stack(rlen)), \
        dict(common, packed=packed, packed_seg=seg)


def test_hp_rows_and_packed_segments_both_match_the_per_chain_loop_in_float64():
    rng = np.random.default_rng()
    chains, rows, packed = hp_case(rng)
    head, p = init("hp", rows, max_chains=5)
    want = ref_hp(p, chains).numpy()
    np.testing.assert_allclose(run(head, p, rows), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(run(head, p, packed), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- properties


def test_every_head_ignores_padding_width_and_contents():
    rng = np.random.default_rng()
    x = pair_inputs(rng)
    wide = dict(x, lig=garbage_pad(np.pad(x["lig"], ((0, 0), (0, 5), (0, 0))), x["lig_len"], -3e3),
                rec=garbage_pad(np.pad(x["rec"], ((0, 0), (0, 2), (0, 0))), x["rec_len"], np.nan))
    for kind in ("ec", "pad"):
        for concat_first in (True, False):
            head, p = init(kind, x, cross_heads=2, concat_first=concat_first)
            np.testing.assert_allclose(run(head, p, wide), run(head, p, x), rtol=1e-12, atol=1e-12)
    n = x["lig_len"]
    head, p = init("sc", dict(x=x["lig"], length=n))
    np.testing.assert_allclose(run(head, p, dict(x=wide["lig"], length=n)), run(head, p, dict(x=x["lig"], length=n)),
                               rtol=1e-12)
    _, rows, packed = hp_case(rng)
    head, p = init("hp", rows, max_chains=5)
    wider = dict(rows, chains=np.pad(rows["chains"], ((0, 0), (0, 2), (0, 3), (0, 0)), constant_values=np.nan),
                 chain_len=np.pad(rows["chain_len"], ((0, 0), (0, 2))))
    np.testing.assert_allclose(run(head, p, wider), run(head, p, rows), rtol=1e-12)
    np.testing.assert_allclose(run(head, p, packed), run(head, p, rows), rtol=1e-10)


def swapped(x):
    return dict(lig=x["rec"], lig_len=x["rec_len"], rec=x["lig"], rec_len=x["lig_len"])


def test_pad_and_concat_first_ec_are_symmetric_in_the_sides_and_concat_ec_is_not():
    rng = np.random.default_rng()
    x = pair_inputs(rng)
    for kind, cfg in (("pad", dict(cross_heads=2)), ("ec", dict(concat_first=True))):
        head, p = init(kind, x, **cfg)
        np.testing.assert_allclose(run(head, p, swapped(x)), run(head, p, x), rtol=1e-10)
    head, p = init("ec", x, concat_first=False)
    assert np.abs(run(head, p, swapped(x)) - run(head, p, x)).max() > 1e-6


def test_hp_is_invariant_to_chain_order_within_a_side_but_not_to_swapping_sides():
    rng = np.random.default_rng()
    chains, rows, _ = hp_case(rng)
    head, p = init("hp", rows, max_chains=5)
    base = run(head, p, rows)
    shuffled = dict(rows, chains=rows["chains"].copy(), chain_len=rows["chain_len"].copy())
    for i, n in enumerate(rows["n_lig"]):
        order = np.r_[rng.permutation(n), n + rng.permutation(rows["n_rec"][i]), np.arange(n + rows["n_rec"][i], 5)]
        shuffled["chains"][i], shuffled["chain_len"][i] = rows["chains"][i][order], rows["chain_len"][i][order]
    np.testing.assert_allclose(run(head, p, shuffled), base, rtol=1e-10)
    flipped = [(rec, lig) for lig, rec in chains]
    assert np.abs(ref_hp(p, flipped).numpy() - base).max() > 1e-6


def test_hp_with_one_chain_per_side_is_plain_pooling_of_each_side():
    rng = np.random.default_rng()
    x = pair_inputs(rng)
    b = len(x["lig_len"])
    width = max(x["lig"].shape[1], x["rec"].shape[1])
    chains = np.zeros((b, 2, width, D))
    chains[:, 0, :x["lig"].shape[1]], chains[:, 1, :x["rec"].shape[1]] = x["lig"], x["rec"]
    rows = dict(chains=chains, chain_len=np.stack([x["lig_len"], x["rec_len"]], 1), n_lig=np.ones(b, int),
                n_rec=np.ones(b, int))
    head, p = init("hp", rows, max_chains=2)
    with jax.enable_x64(True):
        pool = lambda v, n: ppi.SimpleAttentionPooling().apply({"params": p["pool"]}, jnp.asarray(v),
                                                               lengths=jnp.asarray(n))
        h = jnp.concatenate([pool(x["lig"], x["lig_len"]), pool(x["rec"], x["rec_len"])], -1)
        h = jax.nn.silu(h @ p["ffn_in"]["kernel"]) @ p["ffn_out"]["kernel"]
        want = (h @ p["output"]["kernel"] + p["output"]["bias"])[:, 0]
    np.testing.assert_allclose(run(head, p, rows), np.asarray(want), rtol=1e-10)


def test_output_layer_is_initialized_as_the_reference():
    x = pair_inputs(np.random.default_rng(0), b=2)
    head = ppi.make_head(ppi.HeadConfig(kind="ec"))
    p = head.init(jax.random.key(1), **x)["params"]
    w = np.asarray(p["output"]["kernel"])
    assert np.all(np.abs(w) <= 0.1) and w.std() > 0.02 and not np.asarray(p["output"]["bias"]).any()
    hidden = np.asarray(p["hidden"]["kernel"])
    assert np.all(np.abs(hidden) <= 1 / np.sqrt(D)) and np.asarray(p["hidden"]["bias"]).any()


def test_bad_head_configs_are_named():
    with pytest.raises(ValueError, match="head kind='mlp'"):
        ppi.HeadConfig(kind="mlp")
    with pytest.raises(ValueError, match="mode='train'"):
        ppi.batch_arrays({}, "hp", "train")


def planted(tmp_path, lora_rank=0, steps=60):
    """(task, trainer, train, valid) on a planted signal: the affinity is the fraction of W in the ligands."""
    from jaxemb.data import ppi as data
    from jaxemb.data import proteins
    from jaxemb.data.sources import ArraySource
    from jaxemb.models.esm2 import Esm2Config
    from jaxemb.models.plm import esm2_backbone
    from jaxemb.train import Trainer, core_config
    rng = np.random.default_rng(0)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    comps = []
    for i in range(192):
        w = rng.uniform(0, 0.5)
        lig = tuple("".join(rng.choice(letters, rng.integers(4, 10), p=np.r_[[(1 - w) / 19] * 18, w, (1 - w) / 19]))
                    for _ in range(rng.integers(1, 3)))
        rec = ("".join(rng.choice(letters, 8)),)
        y = 10 * sum(s.count("W") for s in lig) / sum(map(len, lig))
        comps.append(data.Complex(f"P{i}", lig, rec, 10.0 ** -y, y, i + 2))
    lay = data.layouts(comps, data.Layout(max_chain=12, max_side=24, max_joint=32))
    arrays, _ = ppi.batch_arrays(lay, "hp", "finetune")
    arrays["y"] = np.array([c.target for c in comps], np.float32)
    enc = Esm2Config(vocab_size=len(proteins.ALPHABET), d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                     token_dropout=False)
    y = arrays["y"]
    task = ppi.PPITask(ppi.HeadConfig(kind="hp", max_chains=3), esm2_backbone(enc), "finetune",
                       target_stats=(y[:160].mean(), y[:160].std()), lora_rank=lora_rank, lora_alpha=8.0)
    cfg = core_config()
    cfg.train.update(steps=steps, batch_size=16, eval_every=steps // 3, eval_batches=2, checkpoint_every=steps,
                     progress=False)
    cfg.optim.update(lr=3e-3, warmup_steps=5)
    take = lambda s: {k: v[s] for k, v in arrays.items()}
    train = ArraySource(take(slice(0, 160)), 16, shuffle=True, drop_last=True)
    valid = ArraySource(take(slice(160, None)), 16)
    return task, Trainer(task, cfg, str(tmp_path)), train, valid


def test_finetuning_an_hp_head_through_the_core_lowers_validation_loss(tmp_path):
    task, trainer, train, valid = planted(tmp_path)
    first = trainer.evaluate(trainer.init_state(trainer.put_batch(train, 0))["params"], valid, 2)["loss"]
    res = trainer.fit(train, valid)
    assert res.eval_metrics["loss"] < 0.6 * first, (first, res.eval_metrics)


def test_lora_trains_only_the_low_rank_updates_and_starts_from_the_encoder(tmp_path):
    task, trainer, train, valid = planted(tmp_path, lora_rank=4, steps=30)
    state = trainer.init_state(trainer.put_batch(train, 0))
    p0 = jax.device_get(state["params"])
    batch = jax.tree.map(jnp.asarray, train.get(0))
    base = dict(p0, lora=jax.tree.map(jnp.zeros_like, p0["lora"]))
    np.testing.assert_allclose(task.predict(p0, batch), task.predict(base, batch), rtol=1e-6)  # B = 0
    assert np.asarray(p0["lora"]["block_0"]["q_a"]).std() > 0
    p1 = jax.device_get(trainer.fit(train, valid).state["params"])
    for a, b in zip(jax.tree.leaves(p0["encoder"]), jax.tree.leaves(p1["encoder"])):
        np.testing.assert_array_equal(a, b)
    assert np.abs(p1["lora"]["block_0"]["v_b"]).max() > 0 and np.abs(p1["lora"]["block_0"]["q_b"]).max() > 0
    with pytest.raises(ValueError, match="lora_rank=4"):
        ppi.PPITask(task.cfg, task.backbone, "frozen", features={}, lora_rank=4)


def test_convbert_heads_keep_padding_and_packed_chains_apart():
    rng = np.random.default_rng()
    _, rows, packed = hp_case(rng)
    head, p = init("hp", rows, max_chains=5, convbert=True)
    np.testing.assert_allclose(run(head, p, packed), run(head, p, rows), rtol=1e-9, atol=1e-12)
    x = pair_inputs(rng)
    wide = dict(x, rec=garbage_pad(np.pad(x["rec"], ((0, 0), (0, 3), (0, 0))), x["rec_len"], np.nan))
    head, p = init("pad", x, cross_heads=2, convbert=True)
    np.testing.assert_allclose(run(head, p, wide), run(head, p, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["sc", "hp", "pad"])  # EC cuts the same arrays as PAD
def test_length_bucketed_fine_tuning_batches_predict_what_full_width_batches_do(kind):
    """Cutting a batch's tokens to its bucket width only drops padding: the same predictions, row by row."""
    from jaxemb.data import ppi as data
    from jaxemb.data import proteins
    from jaxemb.data.sources import ArraySource, BucketSource
    from jaxemb.models.esm2 import Esm2Config
    from jaxemb.models.plm import esm2_backbone
    rng = np.random.default_rng()
    letters = list("ACDEFGHIKLMNPQRSTVWY")
    comps = [data.Complex(f"P{i}", tuple("".join(rng.choice(letters, rng.integers(2, 30))) for _ in range(rng.integers(1, 3))),
                          ("".join(rng.choice(letters, rng.integers(2, 12))),), 1e-9, 9.0, i + 2) for i in range(24)]
    lay = data.layouts(comps, data.Layout(max_chain=40, max_side=80, max_joint=100))
    arrays, _ = ppi.batch_arrays(lay, kind, "finetune")
    arrays["y"] = np.zeros(24, np.float32)
    enc = Esm2Config(vocab_size=len(proteins.ALPHABET), d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                     token_dropout=False)
    task = ppi.PPITask(ppi.HeadConfig(kind=kind, max_chains=3, cross_heads=2), esm2_backbone(enc), "finetune")
    full = ArraySource(arrays, 8)
    cut, lengths = ppi.bucket_spec(arrays, kind, "finetune")
    bucketed = BucketSource(arrays, lengths, 8, cut, quantum=16)
    import flax.linen as nn
    params = nn.unbox(jax.jit(task.init)(jax.random.key(int(rng.integers(1 << 30))), full.get(0)))
    predict = jax.jit(task.predict)
    run = lambda src: np.concatenate([predict(params, src.get(i)) for i in range(src.num_batches)])[:24]
    widths = {bucketed.get(i)[cut[0]].shape[1] for i in range(bucketed.num_batches)}
    assert len(widths) > 1 and max(widths) <= arrays[cut[0]].shape[1]
    out = np.empty(24, np.float32)
    out[bucketed.row_order(0)] = run(bucketed)
    np.testing.assert_allclose(out, run(full), rtol=2e-5, atol=2e-5)
    assert ppi.bucket_spec(arrays, kind, "frozen") is None
