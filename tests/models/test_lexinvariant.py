import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs.lexinvariant import get_config
from jaxemb.data import text
from jaxemb.models.lexinvariant import LanguageModelTask, semi_lexinvariant_substitute
from jaxemb.nn.embeddings import token_nll
from jaxemb.nn.lexinvariant_vectors import sequence_tables
from jaxemb.train import Trainer


def _task(kind, **model):
    cfg = get_config("tiny")
    cfg.model.kind = kind
    cfg.model.update(**model)
    return cfg, LanguageModelTask(cfg.model, cfg.data.seq_len)


def _batch(rng, b=3, length=24, vocab=256):
    tokens = rng.integers(0, vocab, size=(b, length + 1)).astype(np.int32)
    return text.lm_batch(tokens, np.ones_like(tokens))


def test_relabelling_tokens_and_table_together_leaves_loss_unchanged():
    rng = np.random.default_rng()
    cfg, task = _task("lexinvariant")
    batch = _batch(rng)
    params = task.init(jax.random.key(int(rng.integers(1 << 30))), batch)
    vocab, dim = cfg.model.vocab_size, cfg.model.d_model
    table = np.asarray(sequence_tables(jax.random.key(int(rng.integers(1 << 30))), 3, vocab, dim))
    perm = rng.permutation(vocab)
    table_p = np.empty_like(table)
    table_p[:, perm] = table  # new id perm[v] carries the vector old id v had

    def nll(inputs, targets, tab):
        logits, _ = task.model.apply(params, jnp.asarray(inputs), jnp.asarray(batch["segment_ids"]),
                                     table=jnp.asarray(tab))
        return np.asarray(token_nll(logits, jnp.asarray(targets)))

    base = nll(batch["inputs"], batch["targets"], table)
    relabelled = nll(perm[batch["inputs"]], perm[batch["targets"]], table_p)
    np.testing.assert_allclose(relabelled, base, rtol=1e-5, atol=1e-5)
    # a table relabelled the wrong way changes the loss (the test can fail)
    other = nll(perm[batch["inputs"]], perm[batch["targets"]], table)
    assert np.abs(other - base).max() > 1e-2


def test_tables_are_reproducible_and_fresh_per_sequence():
    key = jax.random.key(np.random.default_rng().integers(1 << 30))
    a = np.asarray(sequence_tables(key, 4, 256, 16))
    b = np.asarray(sequence_tables(key, 4, 256, 16))
    np.testing.assert_array_equal(a, b)
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(a[i] - a[j]).max() > 0.5
    c = np.asarray(sequence_tables(jax.random.fold_in(key, 1), 4, 256, 16))
    assert np.abs(a - c).max() > 0.5
    # N(0, 1) entries
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05


def test_same_token_same_vector_within_a_sequence_not_across():
    cfg, task = _task("lexinvariant", scale_bias=False)
    tokens = jnp.asarray([[5, 7, 5, 9], [5, 7, 5, 9]], jnp.int32)
    params = task.init(jax.random.key(0), {"inputs": tokens, "segment_ids": jnp.ones_like(tokens)})
    x, _ = task.model.apply(params, tokens, rngs={"lexinv": jax.random.key(3)},
                            method=lambda m, t: m.embed.encode(t))
    x = np.asarray(x)
    np.testing.assert_array_equal(x[0, 0], x[0, 2])
    np.testing.assert_array_equal(x[1, 0], x[1, 2])
    assert np.abs(x[0, 0] - x[1, 0]).max() > 0.1


def test_semi_substitution_probability_and_consistent_permutation():
    rng = np.random.default_rng()
    p, vocab = 0.2, 64
    tokens = jnp.asarray(rng.integers(0, vocab, size=(16, 4096)), jnp.int32)
    out = np.asarray(semi_lexinvariant_substitute(tokens, jax.random.key(int(rng.integers(1 << 30))), p, vocab))
    t = np.asarray(tokens)
    changed = (out != t).mean()
    expected = p * (1 - 1 / vocab)  # a permutation can map a token to itself
    assert abs(changed - expected) < 0.01
    for b in range(16):
        mask = out[b] != t[b]
        mapping = {}
        for src, dst in zip(t[b][mask], out[b][mask]):
            assert mapping.setdefault(src, dst) == dst  # one permutation per sequence
    assert (semi_lexinvariant_substitute(tokens, jax.random.key(0), 0.0, vocab) == tokens).all()


def test_lexinvariant_model_learns_in_context(tmp_path):
    """On a corpus of random 'words' each repeated along its document, a short run makes late positions
    (the word seen before) far easier than early ones."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(400):
        word = bytes(rng.integers(97, 123, size=6).tolist()).decode() + " "
        docs.append(word * 12)
    cfg = get_config("tiny")
    cfg.model.kind = "lexinvariant"
    cfg.model.update(d_model=64, num_layers=2, num_heads=4, head_dim=16, mlp_dim=128)
    cfg.data.seq_len = 48
    cfg.train.update(steps=200, batch_size=16, eval_every=0, checkpoint_every=0, progress=False)
    cfg.optim.update(lr=1e-2, warmup_steps=10)
    tok = text.ByteTokenizer()
    src = text.PackedSource(text.pack([tok.encode(d) for d in docs], 48), 16, 0)
    task = LanguageModelTask(cfg.model, 48)
    trainer = Trainer(task, cfg, str(tmp_path))
    state = trainer.fit(src).state
    rows = text.contiguous_rows([tok.encode(d) for d in docs[:64]], 48, 64)

    class Rows:
        batch_size = 16

        def get(self, i, r=slice(None)):
            sel = rows[i * 16:(i + 1) * 16][r]
            return text.lm_batch(sel, np.ones_like(sel))

    nll = np.concatenate(trainer.map_batches(task.position_nll, state["params"], Rows(), 4)).mean(0)
    early, late = nll[:6].mean(), nll[-12:].mean()
    assert late < 0.5 * early, (early, late)
