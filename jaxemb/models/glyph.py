"""Transformer LM with frozen visual Unicode-glyph embeddings (Bochkov 2025) as a training-core Task.

kind = 'glyph'      the input table is the glyph matrix (jaxemb.data.glyphs), frozen; untied output head
kind = 'trainable'  the same architecture with a learned input table (untied head): the baseline
kind = 'random'     a frozen table of random unit vectors (Gaussian or binary +-1) of the same size (ablation)

The glyph table is a core constant (`Task.constants`): placed once, sharded ('vocab', 'embed') (at
65,536 x 1024 split over the tensor and fsdp mesh axes), read from the flax collection 'constants', and never
in the parameters, the optimizer state or the checkpoints. The random table is a parameter drawn from the
seed and declared frozen (`Task.frozen`): the core stops its gradient and gives it no optimizer state.
Rows are unit norm; the module multiplies them by sqrt(table columns), giving inputs the per-coordinate
scale of the trainable N(0, 1) table.
model.projection: 'none' or 'fixed' (table columns = d_model; for 'fixed' the builder's PCA kept the top
d_model components), 'learned' (a trainable table_dim -> d_model matrix after the frozen table).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.models.lexinvariant import LanguageModelTask
from jaxemb.nn.embeddings import TokenEmbedding
from jaxemb.nn.transformer import Transformer, TransformerConfig
from jaxemb.train.validate import validate_transformer
from jaxemb.train import logical

KINDS = ("glyph", "trainable", "random")
FROZEN_PATH = ("embed", "embedding")


def random_table_init(kind: str = "gaussian"):
    """Initializer of random unit-norm rows: 'gaussian' (normalised N(0, I)) or 'binary' (+-1 / sqrt(k))."""
    if kind not in ("gaussian", "binary"):
        raise ValueError(f"model.random={kind!r}; expected 'gaussian' or 'binary'")

    def init(key, shape, dtype=jnp.float32):
        x = jax.random.normal(key, shape, jnp.float32)
        if kind == "binary":
            x = jnp.where(x >= 0, 1.0, -1.0)
        return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    return init


class FrozenEmbedding(nn.Module):
    """A frozen (vocab_size, table_dim) input table with an untied, trainable output head. The table is the
    variable 'embedding' of the 'constants' collection when `table_init` is None, else a parameter."""
    vocab_size: int
    dim: int
    table_dim: int
    table_init: object = None
    projection: str = "none"

    def setup(self):
        if self.projection not in ("none", "fixed", "learned"):
            raise ValueError(f"model.projection={self.projection!r}; expected 'none', 'fixed' or 'learned'")
        if self.projection != "learned" and self.table_dim != self.dim:
            raise ValueError(f"frozen table has {self.table_dim} columns but d_model={self.dim}; use "
                             "projection='learned' or build the table with dim=d_model")
        shape = (self.vocab_size, self.table_dim)
        if self.table_init is None:
            self.table = self.variable("constants", "embedding", jnp.zeros, shape, jnp.float32).value
        else:
            self.table = self.param("embedding", nn.with_logical_partitioning(self.table_init, ("vocab", "embed")),
                                    shape)
        if self.projection == "learned":
            self.proj = nn.Dense(self.dim, use_bias=False, name="proj", kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, "embed")))
        self.head = nn.Dense(self.vocab_size, use_bias=False, name="head", kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(self.dim ** -0.5), ("embed", "vocab")))

    def encode(self, tokens):
        x = jnp.take(self.table, tokens, axis=0) * self.table_dim ** 0.5
        if self.projection == "learned":
            x = self.proj(x)
        return x, None

    def logits(self, h, ctx):
        return self.head(h).astype(jnp.float32)


def build_model(model_cfg, table: np.ndarray | None = None) -> Transformer:
    """The shared Transformer with the embedding module of model_cfg.kind (glyph needs `table`)."""
    c = model_cfg
    if c.kind not in KINDS:
        raise ValueError(f"model.kind={c.kind!r}; expected one of {KINDS}")
    validate_transformer(model_cfg)
    tcfg = TransformerConfig(vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers,
                             num_heads=c.num_heads, head_dim=c.head_dim, mlp_dim=c.mlp_dim, position=c.position,
                             remat=c.remat, query_blocks=c.query_blocks)
    if c.kind == "trainable":
        return Transformer(tcfg, TokenEmbedding(c.vocab_size, c.d_model, tied=False))
    if c.kind == "glyph":
        if table is None:
            raise ValueError("model.kind='glyph' needs the glyph matrix (jaxemb.data.glyphs.build_glyph_matrix)")
        width, init = table.shape[1], None
    else:
        width, init = (c.table_dim or c.d_model), random_table_init(c.random)
    return Transformer(tcfg, FrozenEmbedding(c.vocab_size, c.d_model, width, init, c.projection))


class GlyphLMTask(LanguageModelTask):
    """Next-token LM over UnicodeTokenizer ids. Metrics: bits per token and, given `char_lengths` (V,)
    (characters per token id), bits per character."""

    def __init__(self, model_cfg, seq_len: int, table: np.ndarray | None = None, char_lengths=None):
        self.cfg = model_cfg
        self.model = build_model(model_cfg, table)
        self.table = None if table is None else np.asarray(table, np.float32)
        self.tokens_per_example = seq_len
        self.char_lengths = None if char_lengths is None else np.asarray(char_lengths, np.float32)

    def constants(self) -> dict:
        if self.cfg.kind != "glyph":
            return {}
        if self.table.shape != (self.cfg.vocab_size, self.table.shape[1]):
            raise ValueError(f"glyph matrix has shape {self.table.shape} but the embedding table needs "
                             f"({self.cfg.vocab_size}, table columns)")
        return {FROZEN_PATH[0]: {FROZEN_PATH[1]: logical(self.table, ("vocab", "embed"))}}

    def frozen(self, path: tuple) -> bool:
        return self.cfg.kind == "random" and tuple(path[-2:]) == FROZEN_PATH

    def init(self, rng, batch):
        variables = super().init(rng, batch)
        return {"params": variables["params"]}  # the 'constants' collection comes from Task.constants

    def parameter_counts(self, params) -> dict:
        """Parameters in all (the glyph table included) and of them frozen (glyph or random table)."""
        sizes = {"/".join(str(getattr(k, "key", k)) for k in p): x.size
                 for p, x in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]}
        const = self.table.size if self.cfg.kind == "glyph" else 0
        frozen = sum(v for k, v in sizes.items() if self.cfg.kind == "random" and k.endswith("embed/embedding"))
        return {"parameters": sum(sizes.values()) + const, "frozen_parameters": frozen + const}

    def sums(self, params, batch, rng, constants=None) -> dict:
        """Summed nll (nats), weight (tokens) and characters of the batch, for exact corpus-level metrics."""
        nll = self.position_nll(params, batch, rng, constants=constants)
        w = batch["weights"]
        out = {"nll": (nll * w).sum(), "tokens": w.sum()}
        if self.char_lengths is not None:
            out["chars"] = (jnp.asarray(self.char_lengths)[batch["targets"]] * w).sum()
        return out

    def eval_step(self, params, batch, rng, constants=None) -> dict:
        s = self.sums(params, batch, rng, constants=constants)
        out = {"loss": (s["nll"], s["tokens"]), "bits_per_token": (s["nll"] / jnp.log(2.0), s["tokens"])}
        if "chars" in s:
            out["bits_per_char"] = (s["nll"] / jnp.log(2.0), s["chars"])
        return out

    def loss(self, params, batch, rng, constants=None):
        s = self.sums(params, batch, rng, constants=constants)
        loss = s["nll"] / jnp.maximum(s["tokens"], 1.0)
        metrics = {"bits_per_token": loss / jnp.log(2.0)}
        if "chars" in s:
            metrics["bits_per_char"] = s["nll"] / jnp.maximum(s["chars"], 1.0) / jnp.log(2.0)
        return loss, metrics


__all__ = ["FrozenEmbedding", "GlyphLMTask", "KINDS", "build_model", "random_table_init"]
