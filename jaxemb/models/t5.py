"""T5-family protein encoders (ProtT5, Ankh) as Hugging Face transformers' `T5EncoderModel` computes them,
on the shared Transformer's encoder mode.

    cfg, params = load_pretrained("path/to/prot_t5_xl_uniref50")   # boxed with logical axis names
    tok = T5Tokenizer("path/to/prot_t5_xl_uniref50", style="prot_t5")
    toks = tok(["MKTAYIAK", "GSHM"])
    out = encode(t5_encoder(cfg), unbox(params), toks.ids, toks.attention_mask)

The pieces: the `shared` token embedding (not scaled); pre-norm blocks with T5's RMS LayerNorm (no mean
subtraction, no bias); attention without the head_dim^-0.5 query scaling (T5 folds it into its init) and
a bidirectional bucketed relative position bias, computed once (block 0's table) and added in every
block; ReLU (`wi`) or gated (`wi_0` activated, times `wi_1`) feed-forward; no biases anywhere; the final
RMS LayerNorm; padded keys masked.

`load_pretrained` reads only the encoder (config.json + model.safetensors, through esm2's reader): the
decoder and LM head of a T5ForConditionalGeneration checkpoint (Ankh) are ignored.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.data.proteins import Tokens, frame_and_pad
from jaxemb.models.esm2 import _download, _looks_like_hub_name, box_like, read_weights
from jaxemb.nn.embeddings import TokenEmbedding
from jaxemb.nn.transformer import Transformer, TransformerConfig

# feed_forward_proj -> (activation, gated), as transformers maps them ('gated-gelu' is gelu_new = tanh)
FEED_FORWARD = {"relu": ("relu", False), "gated-relu": ("relu", True), "gelu": ("gelu_erf", False),
                "gated-gelu": ("gelu_tanh", True)}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    vocab_size: int = 128
    d_model: int = 1024
    d_kv: int = 64
    num_heads: int = 16
    d_ff: int = 4096
    num_layers: int = 24
    rel_buckets: int = 32
    rel_max_distance: int = 128
    norm_eps: float = 1e-6
    feed_forward_proj: str = "relu"  # one of FEED_FORWARD
    dtype: str = "float32"
    remat: bool = False
    attention_chunk: int = 0  # queries per attention chunk (TransformerConfig.attention_chunk); 0 = whole

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}; expected one of {sorted(FEED_FORWARD)}")

    def transformer(self) -> TransformerConfig:
        act, gated = FEED_FORWARD[self.feed_forward_proj]
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
            num_heads=self.num_heads, head_dim=self.d_kv, mlp_dim=self.d_ff, position="t5",
            rel_buckets=self.rel_buckets, rel_max_distance=self.rel_max_distance, causal=False,
            use_bias=False, norm="rms", attn_scale=False, mlp_activation=act, mlp_gated=gated,
            norm_eps=self.norm_eps, final_norm=True, dtype=self.dtype, remat=self.remat,
            attention_chunk=self.attention_chunk)


def t5_encoder(cfg: T5EncoderConfig) -> Transformer:
    return Transformer(cfg.transformer(), TokenEmbedding(cfg.vocab_size, cfg.d_model))


@functools.partial(jax.jit, static_argnums=0)
def encode(model: Transformer, params, tokens, attention_mask=None) -> dict:
    """{'last_hidden_state': (B, L, d) after the final layer norm, 'layers': each block's output}. `params`
    unboxed; `attention_mask` (B, L), 1 at real tokens."""
    tokens = jnp.asarray(tokens)
    mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask)
    _, hidden = model.apply({"params": params}, tokens, attention_mask=mask)
    return {"last_hidden_state": hidden["final"], "layers": hidden["layers"]}


# ---------------------------------------------------------------- loading Hugging Face checkpoints

IGNORED_PREFIXES = ("decoder.", "lm_head.")


def config_from_hf(hf: dict, where: str = "config.json") -> T5EncoderConfig:
    """T5EncoderConfig from a HF T5Config dict; ValueError naming the field for anything unsupported."""
    if hf.get("model_type") not in ("t5", "mt5"):
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}; expected 't5' or 'mt5' (a T5 checkpoint)")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD:
        raise ValueError(f"{where}: feed_forward_proj={proj!r} is not supported; expected one of {sorted(FEED_FORWARD)}")
    try:
        return T5EncoderConfig(
            vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]), d_kv=int(hf["d_kv"]),
            num_heads=int(hf["num_heads"]), d_ff=int(hf["d_ff"]), num_layers=int(hf["num_layers"]),
            rel_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            rel_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), feed_forward_proj=proj)
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None


def _expected_shapes(cfg: T5EncoderConfig) -> dict:
    d, inner, f = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    out = {"shared.weight": (cfg.vocab_size, d), "encoder.final_layer_norm.weight": (d,),
           "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (cfg.rel_buckets, cfg.num_heads)}
    gated = FEED_FORWARD[cfg.feed_forward_proj][1]
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        for n in "qkv":
            out[f"{p}0.SelfAttention.{n}.weight"] = (inner, d)
        out[f"{p}0.SelfAttention.o.weight"] = (d, inner)
        out[f"{p}0.layer_norm.weight"] = out[f"{p}1.layer_norm.weight"] = (d,)
        for n in (("wi_0", "wi_1") if gated else ("wi",)):
            out[f"{p}1.DenseReluDense.{n}.weight"] = (f, d)
        out[f"{p}1.DenseReluDense.wo.weight"] = (d, f)
    return out


def params_from_hf(state: dict, cfg: T5EncoderConfig, where: str = "checkpoint", dtype=np.float32):
    """Params boxed with logical axis names from HF-named arrays. The embedding is `shared.weight`, or
    `encoder.embed_tokens.weight` when only that is stored (both are one tied tensor in HF). One ValueError
    naming the first missing, unexpected or mis-shaped weight."""
    state = dict(state)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state.pop("encoder.embed_tokens.weight", None)
    want = _expected_shapes(cfg)
    for name, shape in want.items():
        if name not in state:
            raise ValueError(f"{where}: weight {name!r} is missing (it has {len(state)} weights)")
        got = tuple(np.shape(state[name]))
        if got != shape:
            raise ValueError(f"{where}: weight {name!r} has shape {got}, expected {shape}")
    extra = [n for n in state if n not in want and not n.startswith(IGNORED_PREFIXES)]
    if extra:
        raise ValueError(f"{where}: unexpected weight {sorted(extra)[0]!r} ({len(extra)} unexpected in all; "
                         "only block 0 has relative_attention_bias in a T5 encoder)")
    get = lambda n: np.asarray(state[n], dtype)
    h, k = cfg.num_heads, cfg.d_kv
    tree = {"embed": {"embedding": get("shared.weight")},
            "rel_bias": {"rel_bias": get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")},
            "ln_final": {"scale": get("encoder.final_layer_norm.weight")}}
    gated = FEED_FORWARD[cfg.feed_forward_proj][1]
    for i in range(cfg.num_layers):
        a, m = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        qkv = np.stack([get(f"{a}SelfAttention.{n}.weight").T for n in "qkv"], 1).reshape(-1, 3, h, k)
        mlp = {"wi": {"kernel": get(f"{m}DenseReluDense.{'wi_0' if gated else 'wi'}.weight").T},
               "wo": {"kernel": get(f"{m}DenseReluDense.wo.weight").T}}
        if gated:
            mlp["wi_linear"] = {"kernel": get(f"{m}DenseReluDense.wi_1.weight").T}
        tree[f"block_{i}"] = {
            "ln_attn": {"scale": get(a + "layer_norm.weight")},
            "attn": {"qkv": {"kernel": qkv}, "out": {"kernel": get(a + "SelfAttention.o.weight").T.reshape(h, k, -1)}},
            "ln_mlp": {"scale": get(m + "layer_norm.weight")}, "mlp": mlp}
    return box_like(tree, cfg, t5_encoder(cfg), "the T5 encoder")


TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_pretrained(path: str, dtype=np.float32):
    """(T5EncoderConfig, encoder params boxed with logical axis names) from a local HF checkpoint directory,
    or a hub name (downloaded through huggingface_hub, tokenizer files included)."""
    if not os.path.isdir(path) and _looks_like_hub_name(path):
        path = _download(path, TOKENIZER_FILES)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face checkpoint directory or a "
                                "hub name like Rostlab/prot_t5_xl_uniref50)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(cfg_file) as f:
        cfg = config_from_hf(json.load(f), cfg_file)
    return cfg, params_from_hf(read_weights(path), cfg, where=path, dtype=dtype)


# ---------------------------------------------------------------- tokenizers

def prot_t5_text(seq: str) -> str:
    """ProtT5's preprocessing: rare residues U Z O B -> X, residues separated by spaces."""
    return " ".join(re.sub(r"[UZOB]", "X", seq))


class T5Tokenizer:
    """Protein sequences -> ids with a checkpoint's own tokenizer files: tokenizer.json (read by the
    `tokenizers` package, as HF's fast tokenizer does) when present, else spiece.model (sentencepiece).

    style 'prot_t5': the text `prot_t5_text(seq)`; style 'ankh': each residue one pre-split word, as Ankh's
    `is_split_into_words=True` usage. Both end each sequence with </s> and right-pad with <pad>.
    Bad input: pieces outside the vocabulary become <unk> and are counted in `Tokens.unknown`; an empty
    sequence is an error; a sequence over `max_length` tokens (</s> included) is truncated keeping the
    final </s>, and counted in `Tokens.truncated`.
    """

    def __init__(self, path: str, style: str = "prot_t5"):
        if style not in ("prot_t5", "ankh"):
            raise ValueError(f"style={style!r}; expected 'prot_t5' or 'ankh'")
        self.style = style
        tj, sp = os.path.join(path, "tokenizer.json"), os.path.join(path, "spiece.model")
        if os.path.exists(tj):
            try:
                import tokenizers
            except ImportError:
                raise ImportError(f"{tj} needs the tokenizers package (pip install tokenizers)") from None
            self._tok, self._sp = tokenizers.Tokenizer.from_file(tj), None
            lookup = self._tok.token_to_id
        elif os.path.exists(sp):
            import sentencepiece
            self._tok, self._sp = None, sentencepiece.SentencePieceProcessor(model_file=sp)
            lookup = lambda t: (lambda i: None if i == self._sp.unk_id() and t != "<unk>" else i)(
                self._sp.piece_to_id(t))
        else:
            raise FileNotFoundError(f"{path}: no tokenizer (expected tokenizer.json or spiece.model)")
        ids = {t: lookup(t) for t in ("<pad>", "</s>", "<unk>")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path}: the tokenizer has no {missing[0]!r} token")
        self.pad_id, self.eos_id, self.unk_id = ids["<pad>"], ids["</s>"], ids["<unk>"]

    def encode(self, seq: str) -> list[int]:
        """Ids of one sequence without the final </s>."""
        if self._tok is not None:
            if self.style == "prot_t5":
                return self._tok.encode(prot_t5_text(seq), add_special_tokens=False).ids
            return self._tok.encode(list(seq), is_pretokenized=True, add_special_tokens=False).ids
        # one residue at a time, as HF's fast tokenizer splits words first (sentencepiece alone would merge
        # neighbouring unknown residues into one <unk>)
        text = prot_t5_text(seq).replace(" ", "") if self.style == "prot_t5" else seq
        return [i for ch in text for i in self._sp.encode(ch)]

    def __call__(self, seqs, max_length: int = 1024, pad_to: int | None = None) -> Tokens:
        if max_length < 2:
            raise ValueError(f"max_length={max_length}; expected at least 2 (a residue and </s>)")

        def encode(seq):
            ids = self.encode(seq)
            return ids, sum(t == self.unk_id for t in ids)

        return frame_and_pad(seqs, encode, [], [self.eos_id], self.pad_id, max_length, pad_to)
