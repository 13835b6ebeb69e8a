"""ESM2 against Hugging Face transformers' EsmModel: live (torch) on fresh random weights, and from a committed
golden fixture (no torch). Tolerance: |jaxemb - HF| <= 1e-5 * max(1, max |HF|) in fp32."""
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.data import proteins
from jaxemb.models import esm2 as E
from jax.sharding import PartitionSpec as P

from jaxemb.nn.transformer import TransformerConfig
from jaxemb.train.constants import place_tree, shardings_of, unbox
from jaxemb.train.mesh import DEFAULT_RULES, make_mesh

import make_esm2_fixture as fx

from helpers import close_to_reference as _close  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "esm2_fixture.npz")




def _check(cfg, params, ids, mask, ref):
    out = E.encode(E.esm2(cfg), unbox(params), ids, mask)
    assert len(out["layers"]) == len(ref["layers"])
    for got, want in zip(out["layers"], ref["layers"]):
        _close(got, want)
    _close(out["last_hidden_state"], ref["last_hidden_state"])


def _fixture():
    z = np.load(FIXTURE)
    state = {k[2:]: z[k] for k in z.files if k.startswith("w:")}
    return json.loads(str(z["config"])), state, z


def test_parity_from_golden_fixture():
    hf, state, z = _fixture()
    cfg, params = E.params_from_hf(state, E.config_from_hf(hf))
    assert cfg.rope_inv_freq == tuple(map(float, state["rotary_embeddings.inv_freq"]))  # the stored, fp16-rounded
    old = {k: v for k, v in state.items() if "inv_freq" not in k}  # older checkpoints: one copy per layer
    old.update({f"encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq": state["rotary_embeddings.inv_freq"]
                for i in range(2)})
    assert E.params_from_hf(old, E.config_from_hf(hf))[0] == cfg
    _check(cfg, params, z["ids"], z["attention_mask"], {"layers": list(z["layers"]),
                                                         "last_hidden_state": z["last_hidden_state"]})
    assert os.path.getsize(FIXTURE) < 300_000


@pytest.mark.requires_transformers
@pytest.mark.parametrize("cls_name", ["EsmModel", "EsmForMaskedLM"])
def test_parity_with_transformers_on_fresh_weights(tmp_path, cls_name):
    """save_pretrained -> load_pretrained, a padded batch of mixed lengths with <mask> tokens; EsmForMaskedLM
    has the `esm.` prefix and an LM head (ignored)."""
    model = fx.tiny_esm(cls_name, seed=1)
    model.save_pretrained(tmp_path)
    toks = proteins.tokenize(fx.SEQUENCES + ["<mask>" * 3 + "LLV"])
    cfg, params = E.load_pretrained(str(tmp_path))
    _check(cfg, params, toks.ids, toks.attention_mask, fx.reference_outputs(model, toks.ids, toks.attention_mask))


@pytest.mark.requires_transformers
def test_pytorch_bin_loads_the_same_params(tmp_path):
    import torch
    model = fx.tiny_esm(seed=2)
    model.save_pretrained(tmp_path / "st")
    os.makedirs(tmp_path / "pt")
    torch.save(model.state_dict(), tmp_path / "pt" / "pytorch_model.bin")
    (tmp_path / "pt" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    a, b = (unbox(E.load_pretrained(str(tmp_path / d))[1]) for d in ("st", "pt"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _write_safetensors(path, arrays, dtypes):
    """The safetensors layout written by hand: 8-byte little-endian header size, JSON header, raw data."""
    header, blobs, offset = {}, [], 0
    for (name, a), dt in zip(arrays.items(), dtypes):
        raw = a.tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_safetensors_reader_reads_f32_f16_bf16_and_sharded_index(tmp_path):
    import ml_dtypes
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5)).astype(np.float32)
    b = rng.normal(size=(4,)).astype(np.float16)
    c = rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16)
    _write_safetensors(tmp_path / "one.safetensors", {"a": a, "b": b}, ["F32", "F16"])
    _write_safetensors(tmp_path / "two.safetensors", {"c": c}, ["BF16"])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "one.safetensors", "b": "one.safetensors", "c": "two.safetensors"}}))
    got = E.read_weights(str(tmp_path))
    for name, want in (("a", a), ("b", b), ("c", c)):
        assert got[name].dtype == want.dtype
        np.testing.assert_array_equal(got[name], want)


def test_token_dropout_and_padding_match_float64_reference():
    rng = np.random.default_rng(3)
    ids = np.array([[0, 5, 32, 7, 32, 2, 1, 1], [0, 4, 4, 2, 1, 1, 1, 1], [0, 9, 9, 9, 9, 9, 9, 2]], np.int32)
    mask = (ids != 1).astype(np.int32)
    table = rng.normal(size=(33, 8))
    emb = E.EsmEmbedding(33, 8)
    x, _ = emb.apply({"params": {"embedding": jnp.asarray(table, jnp.float32)}}, jnp.asarray(ids),
                     jnp.asarray(mask), method="encode")
    ratio = (ids == 32).sum(-1) / mask.sum(-1)
    want = np.where((ids == 32)[..., None], 0.0, table[ids]) * 0.88 / (1 - ratio)[:, None, None] * mask[..., None]
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(x)[0, 6:] == 0) and not np.allclose(want[1], table[ids[1]] * mask[1, :, None])


def test_params_are_boxed_with_logical_names_and_shard():
    hf, state, _ = _fixture()
    cfg, params = E.params_from_hf(state, E.config_from_hf(hf))
    assert params["embed"]["embedding"].names == ("vocab", "embed")
    assert params["block_0"]["attn"]["qkv"]["kernel"].names == ("embed", None, "heads", "kv")
    mesh = make_mesh({"data": 2, "fsdp": 4})
    sh = shardings_of(params, mesh, DEFAULT_RULES)
    specs = {str(s.spec) for s in jax.tree.leaves(sh)}
    assert any("fsdp" in s for s in specs), specs  # FSDP shards some weights
    placed = place_tree(params, mesh, DEFAULT_RULES)  # as the core places a Task constant
    assert placed["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    ids = proteins.tokenize(["MKTAYIAK", "GSHM"]).ids
    model = E.esm2(cfg)
    np.testing.assert_allclose(np.asarray(E.encode(model, placed, ids)["last_hidden_state"]),
                               np.asarray(E.encode(model, unbox(params), ids)["last_hidden_state"]), atol=1e-5)


def test_hub_name_downloads_into_the_same_path(monkeypatch, tmp_path):
    hf, state, _ = _fixture()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    _write_safetensors(tmp_path / "model.safetensors", state, ["F32"] * len(state))
    asked = []
    fake = types.SimpleNamespace(snapshot_download=lambda name, **kw: asked.append(name) or str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)  # no network here
    cfg, params = E.load_pretrained("someorg/esm2_tiny")
    assert asked == ["someorg/esm2_tiny"] and cfg.num_layers == 2
    jax.tree.map(np.testing.assert_array_equal, unbox(params), unbox(E.params_from_hf(state, E.config_from_hf(hf))[1]))


def _expect_error(match, fn):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        fn()


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    hf, state, _ = _fixture()
    cfg = E.config_from_hf(hf)
    missing = {k: v for k, v in state.items() if k != "encoder.layer.1.output.dense.bias"}
    _expect_error("'encoder.layer.1.output.dense.bias' is missing", lambda: E.params_from_hf(missing, cfg))
    extra = {**state, "encoder.layer.0.attention.self.extra.weight": np.zeros(3)}
    _expect_error("unexpected weight 'encoder.layer.0.attention.self.extra.weight'",
                  lambda: E.params_from_hf(extra, cfg))
    bad = {**state, "encoder.layer.0.intermediate.dense.weight": np.zeros((64, 31), np.float32)}
    _expect_error(r"'encoder.layer.0.intermediate.dense.weight' has shape \(64, 31\), expected \(64, 32\)",
                  lambda: E.params_from_hf(bad, cfg))
    heads = {**{"esm." + k: v for k, v in state.items()}, "lm_head.bias": np.zeros(33),
             "pooler.dense.weight": np.zeros((32, 32)), "embeddings.position_ids": np.arange(64)}
    jax.tree.map(np.testing.assert_array_equal, unbox(E.params_from_hf(heads, cfg)[1]),
                 unbox(E.params_from_hf(state, cfg)[1]))
    for key, value, match in (("model_type", "bert", "model_type='bert'"),
                              ("position_embedding_type", "absolute", "position_embedding_type='absolute'"),
                              ("emb_layer_norm_before", True, "emb_layer_norm_before=True"),
                              ("is_folding_model", True, "is_folding_model=True")):
        _expect_error(match, lambda: E.config_from_hf({**hf, "model_type": "esm", key: value}))
    _expect_error("missing field 'hidden_size'",
                  lambda: E.config_from_hf({k: v for k, v in hf.items() if k != "hidden_size"}))
    _expect_error("no config.json", lambda: E.load_pretrained(str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "esm"}))
    _expect_error("no weights", lambda: E.load_pretrained(str(tmp_path)))
    _expect_error("not a directory", lambda: E.load_pretrained(str(tmp_path / "nope")))
    _expect_error("rope_inv_freq has 1 values; expected head_dim/2 = 4",
                  lambda: TransformerConfig(head_dim=8, rope_inv_freq=(1.0,)))


@pytest.mark.requires_transformers
def test_checkpoint_with_chunked_attention_gives_the_same_hidden_states(tmp_path):
    """plm.from_checkpoint(..., attention_chunk=c) changes only how attention is computed."""
    from jaxemb.models import plm
    fx.tiny_esm("EsmModel", seed=3).save_pretrained(tmp_path)
    whole, params = plm.from_checkpoint(str(tmp_path))
    chunked, _ = plm.from_checkpoint(str(tmp_path), attention_chunk=3)
    assert (whole.cfg.attention_chunk, chunked.cfg.attention_chunk) == (0, 3)
    toks = proteins.tokenize(fx.SEQUENCES)
    p = unbox(params)
    h = lambda bb: np.asarray(plm.hidden(bb.model(), p, toks.ids, toks.attention_mask))
    np.testing.assert_allclose(h(chunked), h(whole), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\['attention_chunks'\] are not fields of Esm2Config"):
        plm.from_checkpoint(str(tmp_path), attention_chunks=3)
