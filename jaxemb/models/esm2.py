"""ESM2 as Hugging Face transformers' `EsmModel` computes it, on the shared Transformer's encoder mode.

    cfg, params = load_pretrained("path/to/esm2_t6_8M_UR50D")     # boxed with logical axis names
    model = esm2(cfg)
    toks = proteins.tokenize(["MKTAYIAK", "GSHM"])
    out = encode(model, unbox(params), toks.ids, toks.attention_mask)  # {"last_hidden_state", "layers"}

The pieces: token embedding with ESM's token-dropout rescaling (<mask> embeddings zeroed, then every row
scaled by 0.88 / (1 - its observed <mask> ratio)), multiplied by the attention mask; pre-LN blocks with
biases, LayerNorm eps from the config, rotary positions 0..L-1 (the checkpoint's own inv_freq), exact-erf
GELU; `emb_layer_norm_after` as the final LayerNorm; padded keys masked. HF scales queries by
head_dim^-0.5 before the rotation, the Transformer after it: the rotation is linear, so the two agree up
to float rounding.

`load_pretrained` reads a local HF checkpoint directory (config.json + model.safetensors, sharded
safetensors with model.safetensors.index.json, or pytorch_model.bin when torch is installed). The LM head,
contact head, pooler, position embeddings and position_ids are not part of EsmModel's hidden states and are
ignored.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.nn.transformer import Transformer, TransformerConfig

MASK_RATIO_TRAIN = 0.15 * 0.8  # the mask ratio of every ESM training run, hard-coded in ESM and HF


@dataclasses.dataclass(frozen=True)
class Esm2Config:
    vocab_size: int = 33
    d_model: int = 320
    num_layers: int = 6
    num_heads: int = 20
    mlp_dim: int = 1280
    norm_eps: float = 1e-5
    token_dropout: bool = True
    mask_token_id: int = 32
    pad_token_id: int = 1
    rope_inv_freq: tuple = ()  # () = base 10000
    dtype: str = "float32"
    remat: bool = False
    attention_chunk: int = 0  # queries per attention chunk (TransformerConfig.attention_chunk); 0 = whole

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
            num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim, position="rope",
            causal=False, use_bias=True, mlp_activation="gelu_erf", norm_eps=self.norm_eps, final_norm=True,
            rope_inv_freq=tuple(self.rope_inv_freq), dtype=self.dtype, remat=self.remat,
            attention_chunk=self.attention_chunk)


class EsmEmbedding(nn.Module):
    """ESM's input embedding (token dropout, padding zeroed). `logits` is a plain tied readout (h @ table^T),
    not ESM's LM head."""
    vocab_size: int
    dim: int
    token_dropout: bool = True
    mask_token_id: int = 32

    def setup(self):
        self.table = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")), (self.vocab_size, self.dim))

    def encode(self, tokens, pad_mask=None):
        x = jnp.take(self.table, tokens, axis=0)
        keep = jnp.ones(tokens.shape, x.dtype) if pad_mask is None else pad_mask.astype(x.dtype)
        if self.token_dropout:
            is_mask = tokens == self.mask_token_id
            x = jnp.where(is_mask[..., None], 0.0, x)
            lengths = jnp.maximum(keep.sum(-1), 1.0)
            kept = 1.0 - is_mask.sum(-1).astype(x.dtype) / lengths
            # (rows of only <mask>/padding would divide by zero in HF; here they are left unscaled)
            x = x * (1 - MASK_RATIO_TRAIN) / jnp.where(kept > 0, kept, 1.0)[:, None, None]
        return x * keep[..., None], None

    def logits(self, h, ctx):
        return jnp.einsum("bld,vd->blv", h, self.table.astype(h.dtype)).astype(jnp.float32)


def esm2(cfg: Esm2Config) -> Transformer:
    return Transformer(cfg.transformer(), EsmEmbedding(cfg.vocab_size, cfg.d_model, cfg.token_dropout,
                                                       cfg.mask_token_id))


@functools.partial(jax.jit, static_argnums=0)
def encode(model: Transformer, params, tokens, attention_mask=None) -> dict:
    """{'last_hidden_state': (B, L, d) after emb_layer_norm_after, 'layers': each block's output (before it)}.
    `params` unboxed ({'embed': ..., 'block_0': ...}); `attention_mask` (B, L), 1 at real tokens. Jitted
    (compiled once per model and shape); inside another jitted function call `model.apply` the same way."""
    tokens = jnp.asarray(tokens)
    mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask)
    _, hidden = model.apply({"params": params}, tokens, attention_mask=mask, pad_mask=mask)
    return {"last_hidden_state": hidden["final"], "layers": hidden["layers"]}


# ---------------------------------------------------------------- loading Hugging Face checkpoints

IGNORED_PREFIXES = ("lm_head.", "contact_head.", "pooler.", "embeddings.position_embeddings.")
IGNORED_NAMES = ("embeddings.position_ids",)


def config_from_hf(hf: dict, where: str = "config.json") -> Esm2Config:
    """Esm2Config from a HF EsmConfig dict; ValueError naming the field for anything EsmModel-with-rotary
    computes differently."""
    if hf.get("model_type") != "esm":
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}; expected 'esm' (an ESM2 checkpoint)")
    checks = {"position_embedding_type": ("rotary",), "emb_layer_norm_before": (False, None),
              "is_folding_model": (False, None), "is_decoder": (False, None), "add_cross_attention": (False, None)}
    for key, ok in checks.items():
        if hf.get(key) not in ok:
            raise ValueError(f"{where}: {key}={hf.get(key)!r} is not supported; expected one of {ok}")
    try:
        cfg = Esm2Config(
            vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
            mlp_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            token_dropout=bool(hf.get("token_dropout", False)),
            mask_token_id=int(hf["mask_token_id"]) if hf.get("mask_token_id") is not None else -1,
            pad_token_id=int(hf.get("pad_token_id") or 1))
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
    theta = float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    if theta != 10000.0:  # inv_freq as HF computes it; a checkpoint's stored inv_freq still wins (params_from_hf)
        dim = cfg.head_dim
        inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        cfg = dataclasses.replace(cfg, rope_inv_freq=tuple(map(float, inv)))
    return cfg


def _expected_shapes(cfg: Esm2Config) -> dict:
    d, m, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    out = {"embeddings.word_embeddings.weight": (v, d),
           "encoder.emb_layer_norm_after.weight": (d,), "encoder.emb_layer_norm_after.bias": (d,)}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            out[f"{p}attention.self.{name}.weight"], out[f"{p}attention.self.{name}.bias"] = (d, d), (d,)
        out[f"{p}attention.output.dense.weight"], out[f"{p}attention.output.dense.bias"] = (d, d), (d,)
        out[f"{p}attention.LayerNorm.weight"] = out[f"{p}attention.LayerNorm.bias"] = (d,)
        out[f"{p}intermediate.dense.weight"], out[f"{p}intermediate.dense.bias"] = (m, d), (m,)
        out[f"{p}output.dense.weight"], out[f"{p}output.dense.bias"] = (d, m), (d,)
        out[f"{p}LayerNorm.weight"] = out[f"{p}LayerNorm.bias"] = (d,)
    return out


def _canonical(name: str) -> str:
    """HF name without the `esm.` prefix, LayerNorm gamma/beta (as transformers 5 saves them) as weight/bias."""
    name = name[4:] if name.startswith("esm.") else name
    for old, new in ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias")):
        if name.endswith(old):
            return name[:-len(old)] + new
    return name


def _is_inv_freq(name: str) -> bool:
    return name == "rotary_embeddings.inv_freq" or (
        name.startswith("encoder.layer.") and name.endswith(".attention.self.rotary_embeddings.inv_freq"))


def params_from_hf(state: dict, cfg: Esm2Config, where: str = "checkpoint", dtype=np.float32):
    """(cfg with the stored inv_freq, params boxed with logical axis names) from HF-named arrays.
    Accepts the `esm.` prefix (EsmForMaskedLM); ignores the heads. One ValueError naming the first missing,
    unexpected or mis-shaped weight."""
    names = {_canonical(k): k for k in state}
    want = _expected_shapes(cfg)
    for name, shape in want.items():
        if name not in names:
            raise ValueError(f"{where}: weight {name!r} is missing (it has {len(state)} weights)")
        got = tuple(np.shape(state[names[name]]))
        if got != shape:
            raise ValueError(f"{where}: weight {names[name]!r} has shape {got}, expected {shape}")
    extra = [names[n] for n in names if n not in want and not _is_inv_freq(n)
             and not n.startswith(IGNORED_PREFIXES) and n not in IGNORED_NAMES
             and not names[n].startswith(IGNORED_PREFIXES)]
    if extra:
        raise ValueError(f"{where}: unexpected weight {sorted(extra)[0]!r} ({len(extra)} unexpected in all)")
    freqs = [n for n in names if _is_inv_freq(n)]
    if freqs:
        # the model-level buffer (transformers >= 5), else the first layer's (older checkpoints), as HF reads it
        first = "rotary_embeddings.inv_freq" if "rotary_embeddings.inv_freq" in names else sorted(freqs)[0]
        inv = np.asarray(state[names[first]], np.float32)
        if inv.shape != (cfg.head_dim // 2,):
            raise ValueError(f"{where}: weight {names[first]!r} has shape {inv.shape}, expected "
                             f"{(cfg.head_dim // 2,)}")
        cfg = dataclasses.replace(cfg, rope_inv_freq=tuple(float(f) for f in inv))
    get = lambda n: np.asarray(state[names[n]], dtype)
    h, k = cfg.num_heads, cfg.head_dim
    tree = {"embed": {"embedding": get("embeddings.word_embeddings.weight")},
            "ln_final": {"scale": get("encoder.emb_layer_norm_after.weight"),
                         "bias": get("encoder.emb_layer_norm_after.bias")}}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        qkv = [f"{p}attention.self.{n}" for n in ("query", "key", "value")]
        tree[f"block_{i}"] = {
            "ln_attn": {"scale": get(p + "attention.LayerNorm.weight"), "bias": get(p + "attention.LayerNorm.bias")},
            "attn": {"qkv": {"kernel": np.stack([get(n + ".weight").T for n in qkv], 1).reshape(-1, 3, h, k),
                             "bias": np.stack([get(n + ".bias") for n in qkv]).reshape(3, h, k)},
                     "out": {"kernel": get(p + "attention.output.dense.weight").T.reshape(h, k, -1),
                             "bias": get(p + "attention.output.dense.bias")}},
            "ln_mlp": {"scale": get(p + "LayerNorm.weight"), "bias": get(p + "LayerNorm.bias")},
            "mlp": {"wi": {"kernel": get(p + "intermediate.dense.weight").T,
                           "bias": get(p + "intermediate.dense.bias")},
                    "wo": {"kernel": get(p + "output.dense.weight").T, "bias": get(p + "output.dense.bias")}}}
    return cfg, box_like(tree, cfg)


def box_like(tree, cfg: Esm2Config, model: nn.Module | None = None, name: str = "ESM2"):
    """`tree` (plain arrays in the model's layout) boxed with the logical axis names of the params of `model`
    (default esm2(cfg)), so that it shards as a Task constant or through place_tree. Checks the structure
    and every shape."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    model = esm2(cfg) if model is None else model
    like = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    flat_like = dict(jax.tree_util.tree_flatten_with_path(like, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0])
    flat = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
    if set(flat) != set(flat_like):
        diff = sorted(map(jax.tree_util.keystr, set(flat) ^ set(flat_like)))
        raise ValueError(f"parameter tree does not match {name}'s: {diff[0]} ({len(diff)} differ)")
    for key, box in flat_like.items():
        if tuple(flat[key].shape) != tuple(box.value.shape):
            raise ValueError(f"parameter {jax.tree_util.keystr(key)} has shape {flat[key].shape}, expected "
                             f"{box.value.shape}")
    return jax.tree.map(lambda b, v: b.replace_boxed(v), like, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def read_weights(path: str) -> dict:
    """{name: numpy array} from model.safetensors (or its sharded index) or pytorch_model.bin in `path`."""
    st, index, pt = (os.path.join(path, f) for f in
                     ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if os.path.exists(st):
        return read_safetensors(st)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for name in files for k, v in read_safetensors(os.path.join(path, name)).items()}
    if os.path.exists(pt):
        try:
            import torch
        except ImportError:
            raise ImportError(f"{pt} is a PyTorch file and torch is not installed (pip install torch, or "
                              "convert the checkpoint to model.safetensors)") from None
        state = torch.load(pt, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    raise FileNotFoundError(f"{path}: no weights (expected model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin)")


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(file: str) -> dict:
    """The safetensors format read with numpy (8-byte header size, JSON header, raw little-endian data),
    memory-mapped; bf16 through ml_dtypes (installed with JAX)."""
    import ml_dtypes
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    data = np.memmap(file, np.uint8, "r", offset=8 + size)
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dt = np.dtype(ml_dtypes.bfloat16) if meta["dtype"] == "BF16" else np.dtype(_ST_DTYPES[meta["dtype"]])
        lo, hi = meta["data_offsets"]
        out[name] = data[lo:hi].view(dt.newbyteorder("<")).reshape(meta["shape"])
    return out


def _looks_like_hub_name(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and not os.path.exists(parts[0])


def _download(name: str, extra_patterns: tuple = ()) -> str:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"{name!r} is no local directory; downloading it as a hub name needs huggingface_hub "
                          "(pip install huggingface_hub)") from None
    return huggingface_hub.snapshot_download(name, allow_patterns=[
        "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors", *extra_patterns])


def load_pretrained(path: str, dtype=np.float32):
    """(Esm2Config, params boxed with logical axis names) from a local HF checkpoint directory, or a hub
    name (org/model, downloaded through huggingface_hub) when no such directory exists. Pass the params as
    a Task constant (the core shards them) or `jaxemb.train.constants.unbox` them to apply."""
    if not os.path.isdir(path) and _looks_like_hub_name(path):
        path = _download(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face checkpoint directory or a "
                                "hub name like facebook/esm2_t6_8M_UR50D)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(cfg_file) as f:
        cfg = config_from_hf(json.load(f), cfg_file)
    return params_from_hf(read_weights(path), cfg, where=path, dtype=dtype)
