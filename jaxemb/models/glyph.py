"""Transformer LM with frozen visual Unicode-glyph embeddings (Bochkov 2025) as a training-core Task.

kind = 'glyph'      the input table is the glyph matrix (jaxemb.data.glyphs), frozen; untied output head
kind = 'trainable'  the same architecture with a learned input table (untied head): the baseline
kind = 'random'     a frozen table of random unit vectors (Gaussian or binary +-1) of the same size (ablation)

A frozen table is a parameter named ('vocab', 'embed') (sharded like any embedding; at 65,536 x 1024 it is
split over the tensor and fsdp mesh axes), read through jax.lax.stop_gradient, and `Task.frozen` names it so
the core gives it no optimizer state and no updates. Rows are unit norm; the module multiplies them by
sqrt(table columns), giving inputs the per-coordinate scale of the trainable N(0, 1) table.
model.projection: 'none' or 'fixed' (table columns = d_model; for 'fixed' the builder's PCA kept the top
d_model components), 'learned' (a trainable table_dim -> d_model matrix after the frozen table).
The glyph matrix enters the parameters through a host callback inside the initializer, so it is never a
constant baked into a compiled program.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.models.lexinvariant import LanguageModelTask
from jaxemb.nn.embeddings import TokenEmbedding
from jaxemb.nn.transformer import Transformer, TransformerConfig

KINDS = ("glyph", "trainable", "random")
FROZEN_PATH = ("embed", "embedding")


def host_table_init(matrix: np.ndarray):
    """Initializer that returns `matrix` (read on the host through jax.pure_callback)."""
    matrix = np.asarray(matrix, np.float32)

    def init(key, shape, dtype=jnp.float32):
        if tuple(shape) != matrix.shape:
            raise ValueError(f"glyph matrix has shape {matrix.shape} but the embedding table needs {tuple(shape)} "
                             "(vocab_size, table columns)")
        out = jax.pure_callback(lambda: matrix, jax.ShapeDtypeStruct(matrix.shape, jnp.float32))
        return out.astype(dtype)

    return init


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
    """A frozen (vocab_size, table_dim) input table with an untied, trainable output head."""
    vocab_size: int
    dim: int
    table_dim: int
    table_init: object
    projection: str = "none"

    def setup(self):
        if self.projection not in ("none", "fixed", "learned"):
            raise ValueError(f"model.projection={self.projection!r}; expected 'none', 'fixed' or 'learned'")
        if self.projection != "learned" and self.table_dim != self.dim:
            raise ValueError(f"frozen table has {self.table_dim} columns but d_model={self.dim}; use "
                             "projection='learned' or build the table with dim=d_model")
        self.table = self.param("embedding", nn.with_logical_partitioning(self.table_init, ("vocab", "embed")),
                                (self.vocab_size, self.table_dim))
        if self.projection == "learned":
            self.proj = nn.Dense(self.dim, use_bias=False, name="proj", kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, "embed")))
        self.head = nn.Dense(self.vocab_size, use_bias=False, name="head", kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(self.dim ** -0.5), ("embed", "vocab")))

    def encode(self, tokens):
        table = jax.lax.stop_gradient(self.table)
        x = jnp.take(table, tokens, axis=0) * self.table_dim ** 0.5
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
    tcfg = TransformerConfig(vocab_size=c.vocab_size, d_model=c.d_model, num_layers=c.num_layers,
                             num_heads=c.num_heads, head_dim=c.head_dim, mlp_dim=c.mlp_dim, position=c.position,
                             remat=c.remat, query_blocks=c.get("query_blocks", 0))
    if c.kind == "trainable":
        return Transformer(tcfg, TokenEmbedding(c.vocab_size, c.d_model, tied=False))
    if c.kind == "glyph":
        if table is None:
            raise ValueError("model.kind='glyph' needs the glyph matrix (jaxemb.data.glyphs.build_glyph_matrix)")
        width, init = table.shape[1], host_table_init(table)
    else:
        width, init = (c.table_dim or c.d_model), random_table_init(c.random)
    return Transformer(tcfg, FrozenEmbedding(c.vocab_size, c.d_model, width, init, c.projection))


class GlyphLMTask(LanguageModelTask):
    """Next-token LM over UnicodeTokenizer ids. Metrics: bits per token and, given `char_lengths` (V,)
    (characters per token id), bits per character."""

    def __init__(self, model_cfg, seq_len: int, table: np.ndarray | None = None, char_lengths=None):
        self.cfg = model_cfg
        self.model = build_model(model_cfg, table)
        self.tokens_per_example = seq_len
        self.char_lengths = None if char_lengths is None else np.asarray(char_lengths, np.float32)

    def frozen(self, path: tuple) -> bool:
        return self.cfg.kind != "trainable" and tuple(path[-2:]) == FROZEN_PATH

    def sums(self, params, batch, rng) -> dict:
        """Summed nll (nats), weight (tokens) and characters of the batch, for exact corpus-level metrics."""
        nll = self.position_nll(params, batch, rng)
        w = batch["weights"]
        out = {"nll": (nll * w).sum(), "tokens": w.sum()}
        if self.char_lengths is not None:
            out["chars"] = (jnp.asarray(self.char_lengths)[batch["targets"]] * w).sum()
        return out

    def loss(self, params, batch, rng):
        s = self.sums(params, batch, rng)
        loss = s["nll"] / jnp.maximum(s["tokens"], 1.0)
        metrics = {"bits_per_token": loss / jnp.log(2.0)}
        if "chars" in s:
            metrics["bits_per_char"] = s["nll"] / jnp.maximum(s["chars"], 1.0) / jnp.log(2.0)
        return loss, metrics


__all__ = ["FrozenEmbedding", "GlyphLMTask", "KINDS", "build_model", "host_table_init", "random_table_init"]
