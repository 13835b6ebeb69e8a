import numpy as np

from jaxemb.models.decipher import key_precision, random_cipher, recover_key


def test_cipher_is_a_bijection():
    rng = np.random.default_rng()
    c = random_cipher(rng, 256)
    assert sorted(c.tolist()) == list(range(256))
    x = rng.integers(0, 256, 1000)
    inverse = np.argsort(c)
    np.testing.assert_array_equal(inverse[c[x]], x)


def test_key_recovery_by_majority_vote_on_a_hand_made_case():
    plain = np.array([1, 2, 1, 3, 1, 2, 3, 3])
    cipher_map = {1: 7, 2: 5, 3: 9}
    cipher = np.array([cipher_map[v] for v in plain])
    # probe predictions: wrong at two positions, right by majority everywhere
    pred = np.array([1, 2, 4, 3, 1, 2, 3, 0])
    keys = recover_key(cipher, pred, window=8)
    assert keys == [{5: 2, 7: 1, 9: 3}]
    np.testing.assert_allclose(key_precision([cipher], [plain], [pred], 8), [1.0])
    # two windows of 4: the first window's 7 -> votes (1, 4, 1)... -> 1; the second window's 9 -> (3, 0) tie -> 0
    keys = recover_key(cipher, pred, window=4)
    assert keys[0] == {7: 1, 5: 2, 9: 3} and keys[1] == {7: 1, 5: 2, 9: 0}
    np.testing.assert_allclose(key_precision([cipher], [plain], [pred], 4), [1.0, 2 / 3])


def test_probe_training_leaves_the_lm_frozen(tmp_path):
    import jax

    from experiments.configs.lexinvariant import get_config
    from experiments.lexinvariant_decipher import cipher_source
    from jaxemb.data import text
    from jaxemb.models.decipher import DecipherProbeTask
    from jaxemb.models.lexinvariant import LanguageModelTask
    from jaxemb.train import Trainer

    cfg = get_config("tiny")
    cfg.model.kind = "lexinvariant"
    cfg.train.update(steps=3, checkpoint_every=0, eval_every=0, progress=False)
    lm = LanguageModelTask(cfg.model, cfg.data.seq_len)
    tok = text.ByteTokenizer()
    docs = text.chunk_docs(text.pydoc_docs())[:20]
    src = text.PackedSource(text.pack([tok.encode(d) for d in docs], cfg.data.seq_len), cfg.train.batch_size, 0)
    lm_params = jax.device_get(lm.init(jax.random.key(0), src.get(0)))
    lm_params = jax.tree.map(lambda x: getattr(x, "value", x), lm_params,
                             is_leaf=lambda x: hasattr(x, "value"))
    task = DecipherProbeTask(lm, lm_params, hidden=32)
    cs = cipher_source(src, 256, 1)
    b = cs.get(0)
    assert (b["inputs"] != b["plain"]).mean() > 0.9
    trainer = Trainer(task, cfg, str(tmp_path))
    state = trainer.fit(cs).state
    assert set(state["params"]) == {"probe"}  # the LM is a constant, not a parameter
    for a, c in zip(jax.tree.leaves(trainer.constants["lm"]), jax.tree.leaves(lm_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    n_probe = sum(x.size for x in jax.tree.leaves(state["params"]["probe"]))
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * n_probe + 8  # Adam moments, probe only
    step = trainer.put_batch(cs, 0)
    m = jax.device_get(trainer.train_step(state, step)[1])
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
