"""Lexinvariant language models (Huang, Zelikman, Chen, Wu, Valiant, Liang, 2023) as a training-core Task.

kind = 'standard'       learned token embeddings (tied or untied readout)
kind = 'lexinvariant'   a fresh N(0, I_d) embedding table per sequence, shared by input and readout
kind = 'semi'           a standard LM whose input tokens are each replaced, with probability p, by pi(x)
                        for a random permutation pi of the vocabulary drawn per sequence (the paper's
                        semi-lexinvariant regulariser); targets stay the true next tokens
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxemb.nn.embeddings import LexinvariantEmbedding, TokenEmbedding
from jaxemb.nn.transformer import Transformer, TransformerConfig
from jaxemb.train.validate import validate_transformer

KINDS = ("standard", "lexinvariant", "semi")


def semi_lexinvariant_substitute(tokens, rng, p: float, vocab_size: int):
    """Replaces each token x by pi_b(x) with probability p; pi_b a random permutation per sequence b."""
    b = tokens.shape[0]
    perm_key, mask_key = jax.random.split(rng)
    keys = jax.vmap(lambda i: jax.random.fold_in(perm_key, i))(jnp.arange(b))
    perms = jax.vmap(lambda k: jax.random.permutation(k, vocab_size))(keys)  # (B, V)
    swapped = jnp.take_along_axis(perms, tokens, axis=1)
    return jnp.where(jax.random.bernoulli(mask_key, p, tokens.shape), swapped, tokens)


def build_model(model_cfg) -> Transformer:
    kind = model_cfg.kind
    if kind not in KINDS:
        raise ValueError(f"model.kind={kind!r}; expected one of {KINDS}")
    validate_transformer(model_cfg)
    tcfg = TransformerConfig(
        vocab_size=model_cfg.vocab_size, d_model=model_cfg.d_model, num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim, mlp_dim=model_cfg.mlp_dim,
        position=model_cfg.position, remat=model_cfg.remat, query_blocks=model_cfg.query_blocks)
    if kind == "lexinvariant":
        embed = LexinvariantEmbedding(model_cfg.vocab_size, model_cfg.d_model, model_cfg.scale_bias,
                                      model_cfg.readout_block)
    else:
        embed = TokenEmbedding(model_cfg.vocab_size, model_cfg.d_model, tied=model_cfg.tied)
    return Transformer(tcfg, embed)


class LanguageModelTask:
    """Next-token cross-entropy on batches {'inputs', 'targets', 'segment_ids', 'weights'} (B, L)."""

    def __init__(self, model_cfg, seq_len: int):
        self.cfg = model_cfg
        self.model = build_model(model_cfg)
        self.tokens_per_example = seq_len

    def init(self, rng, batch):
        return self.model.init({"params": rng, "lexinv": rng}, batch["inputs"], batch["segment_ids"])

    def apply(self, params, batch, rng, constants=None, **kwargs):
        """(logits (B, L, V), hidden dict). rng keys the lexinvariant tables / substitutions; `constants`
        (Task.constants of a subclass) is the model's 'constants' collection."""
        inputs = batch["inputs"]
        sub_rng, lex_rng = jax.random.split(rng)
        if self.cfg.kind == "semi" and self.cfg.semi_p > 0:
            inputs = semi_lexinvariant_substitute(inputs, sub_rng, self.cfg.semi_p, self.cfg.vocab_size)
        variables = dict(params, constants=constants) if constants else params
        return self.model.apply(variables, inputs, batch["segment_ids"], rngs={"lexinv": lex_rng}, **kwargs)

    def position_nll(self, params, batch, rng, constants=None):
        nll, _ = self.apply(params, batch, rng, constants=constants, targets=batch["targets"])
        return nll

    def loss(self, params, batch, rng, constants=None):
        nll = self.position_nll(params, batch, rng, constants=constants)
        w = batch["weights"]
        count = jnp.maximum(w.sum(), 1.0)
        loss = (nll * w).sum() / count
        return loss, {"bits_per_token": loss / jnp.log(2.0)}


def parameter_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))
