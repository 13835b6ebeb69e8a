import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.configs.glyph import get_config
from jaxemb.data import glyphs, text
from jaxemb.data.unicode_tokenizer import UnicodeTokenizer
from jaxemb.models.glyph import GlyphLMTask
from jaxemb.train import Trainer

VOCAB, SEQ = 96, 32


def _cfg(kind, **model):
    cfg = get_config("tiny")
    cfg.model.update(kind=kind, vocab_size=VOCAB, **model)
    cfg.train.update(steps=3, log_every=1, eval_every=0, checkpoint_every=0, progress=False)
    return cfg


def _table(dim=32):
    ids = np.arange(32, 32 + VOCAB)  # printable ASCII and a little more
    return glyphs.build_glyph_matrix(UnicodeTokenizer(), ids, [glyphs.UNIFONT_PATHS[0]], dim=dim, use_cache=False)


def _source(batch_size=8):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, 300) for _ in range(8)]
    return text.PackedSource(text.pack(docs, SEQ), batch_size, 0)


def _paths(tree):
    return [(tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.requires_unifont
def test_frozen_glyph_table_is_bit_identical_sharded_and_has_no_optimizer_state(tmp_path):
    table = _table()
    cfg = _cfg("glyph")
    cfg.mesh.shape = dict(data=2, fsdp=2, tensor=2)
    task = GlyphLMTask(cfg.model, SEQ, table, np.ones(VOCAB))
    trainer = Trainer(task, cfg, str(tmp_path))
    src = _source()
    state = trainer.fit(src).state
    emb = trainer.constants["embed"]["embedding"]
    assert np.asarray(emb).tobytes() == table.tobytes()  # bit-identical after 3 optimizer steps
    assert emb.sharding.spec == P("tensor", "fsdp") and len(emb.sharding.device_set) == 8
    assert "embedding" not in state["params"]["params"]["embed"]  # a constant: not a parameter
    opt = _paths(state["opt_state"])
    assert not any("embedding" in p for p, _ in opt)  # no moments for the frozen table
    head_mu = [x for p, x in opt if "mu" in p and "head" in p]
    assert len(head_mu) == 1 and head_mu[0].shape == (32, VOCAB) and np.asarray(head_mu[0]).any()
    # the table is read: another table gives another loss
    b = trainer.put_batch(src, 0)
    loss = lambda c: float(task.loss(state["params"], b, jax.random.key(0), constants=c)[0])
    other = {"embed": {"embedding": emb[::-1]}}
    assert loss(trainer.constants) != loss(other)


def test_frozen_random_table_gets_no_update_and_no_optimizer_state(tmp_path):
    cfg = _cfg("random")
    task = GlyphLMTask(cfg.model, SEQ)
    trainer = Trainer(task, cfg, str(tmp_path))
    src = _source()
    start = jax.device_get(trainer.init_state(trainer.put_batch(src, 0))["params"]["params"]["embed"]["embedding"])
    state = trainer.fit(src).state
    emb = state["params"]["params"]["embed"]["embedding"]
    np.testing.assert_array_equal(np.asarray(emb), start)
    assert not any("embedding" in p for p, _ in _paths(state["opt_state"]))
    counts = task.parameter_counts(state["params"])
    assert counts["frozen_parameters"] == VOCAB * 32 and counts["parameters"] > VOCAB * 32


@pytest.mark.parametrize("kind", ["random", "trainable"])
def test_random_and_trainable_tables(kind):
    for random in (["gaussian", "binary"] if kind == "random" else ["gaussian"]):
        task = GlyphLMTask(_cfg(kind, random=random).model, SEQ)
        embed = task.model.embed  # the embedding module alone
        params = nn.unbox(embed.init(jax.random.key(0), _source().get(0)["inputs"], method=embed.encode))
        emb = np.asarray(params["params"]["embedding"])
        assert emb.shape == (VOCAB, 32)
        assert task.frozen(("params", "embed", "embedding")) == (kind == "random")
        assert not task.frozen(("params", "embed", "head", "kernel"))
        if kind == "random":
            np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
        if random == "binary":
            np.testing.assert_allclose(np.abs(emb), 32 ** -0.5, rtol=1e-6)


@pytest.mark.requires_unifont
def test_glyph_encode_reads_the_table_and_projection_options():
    table, tokens = _table(dim=64), _source().get(0)["inputs"]
    embed = GlyphLMTask(_cfg("glyph").model, SEQ, table).model.embed
    with pytest.raises(ValueError, match="64 columns but d_model=32"):
        embed.init(jax.random.key(0), tokens, method=embed.encode)
    embed = GlyphLMTask(_cfg("glyph", projection="learned").model, SEQ, table).model.embed
    params = nn.unbox(embed.init(jax.random.key(0), tokens, method=embed.encode))
    assert params["params"]["proj"]["kernel"].shape == (64, 32) and "embedding" not in params["params"]
    params = {"params": params["params"], "constants": {"embedding": table}}
    x, _ = embed.apply(params, tokens, method=embed.encode)
    proj = np.asarray(params["params"]["proj"]["kernel"])
    np.testing.assert_allclose(np.asarray(x), table[tokens] * 8.0 @ proj, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the glyph matrix"):
        GlyphLMTask(_cfg("glyph").model, SEQ)


def test_paper_config_shapes_and_sharding():
    cfg = get_config("paper")
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.position, cfg.data.seq_len, cfg.data.vocab) == \
        (16, 1024, 32, "rope", 1024, "full")
    m.vocab_size = 65536
    task = GlyphLMTask(m, cfg.data.seq_len, np.zeros((65536, 1024), np.float32))
    batch = {"inputs": jax.ShapeDtypeStruct((1, 1024), np.int32),
             "segment_ids": jax.ShapeDtypeStruct((1, 1024), np.int32)}
    boxed = jax.eval_shape(task.init, jax.random.key(0), batch)
    emb = task.constants()["embed"]["embedding"]
    assert emb.value.shape == (65536, 1024) and emb.names == ("vocab", "embed")
    assert len([k for k in boxed["params"] if k.startswith("block_")]) == 16
    assert boxed["params"]["block_0"]["attn"]["qkv"]["kernel"].value.shape == (1024, 3, 32, 32)
    assert task.parameter_counts(nn.unbox(boxed))["frozen_parameters"] == 65536 * 1024
