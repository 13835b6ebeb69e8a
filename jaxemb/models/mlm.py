"""Masked-LM pretraining of an ESM2-architecture encoder through the training core.

    rows = pack_chains(train_chains, seq_len=128)          # {'tokens', 'segment_ids'} (N, L), chains packed
    task = MLMTask(Esm2Config(d_model=64, num_layers=4, num_heads=4, mlp_dim=256, token_dropout=False))

Chains are framed `<cls> residues <eos>` and packed greedily into rows; segment ids (1, 2, ... per row,
0 = padding) keep every residue from attending across chains and restart the rotary positions. A chain
longer than seq_len - 2 residues is cut into consecutive pieces, each framed. BERT/ESM masking, drawn from
the step rng inside jit: each residue (never <cls>, <eos>, <pad>, <unk>, <mask>) is selected with
probability 0.15; a selected residue becomes <mask> (80%), a uniformly drawn standard residue (10%) or
stays (10%). The loss is the mean cross-entropy over the selected residues only.

ESM's token dropout rescales each row by its observed <mask> ratio, which would couple the chains packed in
one row, so pretraining here uses token_dropout=False (the rescaling is an inference-time correction for
models trained with it).
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxemb.data import proteins
from jaxemb.models.esm2 import Esm2Config, esm2

MASKABLE_LO, MASKABLE_HI = proteins.INDEX["L"], proteins.INDEX["-"]  # ids L..- are residues (and gaps)
STANDARD = np.array([proteins.INDEX[a] for a in "LAGVSERTIDPKQNFYMHWC"], np.int32)  # random replacements


def maskable(tokens):
    """True at residue tokens (not <cls>, <pad>, <eos>, <unk>, <null_1>, <mask>)."""
    return (tokens >= MASKABLE_LO) & (tokens <= MASKABLE_HI)


def mask_tokens(rng, tokens, rate: float = 0.15, mask_frac: float = 0.8, random_frac: float = 0.1):
    """(inputs, selected): each residue selected with probability `rate`; selected ones become <mask>
    (mask_frac), a random standard residue (random_frac) or stay. Special tokens are never selected."""
    k_sel, k_kind, k_res = jax.random.split(rng, 3)
    selected = (jax.random.uniform(k_sel, tokens.shape) < rate) & maskable(tokens)
    u = jax.random.uniform(k_kind, tokens.shape)
    random_res = jnp.asarray(STANDARD)[jax.random.randint(k_res, tokens.shape, 0, len(STANDARD))]
    inputs = jnp.where(selected & (u < mask_frac), proteins.MASK,
                       jnp.where(selected & (u < mask_frac + random_frac), random_res, tokens))
    return inputs.astype(tokens.dtype), selected


class MLMTask:
    """Task for the core. Batch: tokens (B, L) int32, segment_ids (B, L) int32 (0 = padding), weights (B,)."""

    def __init__(self, cfg: Esm2Config, seq_len: int = 128, rate: float = 0.15, mask_frac: float = 0.8,
                 random_frac: float = 0.1):
        if not 0 < rate <= 1 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
            raise ValueError(f"masking rate={rate}, mask_frac={mask_frac}, random_frac={random_frac}; expected "
                             "0 < rate <= 1 and mask_frac + random_frac <= 1")
        if cfg.vocab_size != len(proteins.ALPHABET):
            raise ValueError(f"model vocab_size={cfg.vocab_size}; expected {len(proteins.ALPHABET)} (ESM's alphabet)")
        self.cfg, self.model = cfg, esm2(cfg)
        self.rate, self.mask_frac, self.random_frac = rate, mask_frac, random_frac
        self.tokens_per_example = seq_len

    def init(self, rng, batch):
        seg = batch["segment_ids"]
        return self.model.init(rng, batch["tokens"], seg, pad_mask=seg > 0)["params"]

    def logits(self, params, tokens, segment_ids):
        return self.model.apply({"params": params}, tokens, segment_ids, pad_mask=segment_ids > 0)[0]

    def _masked(self, params, batch, rng):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        inputs, selected = mask_tokens(rng, tokens * (seg > 0), self.rate, self.mask_frac, self.random_frac)
        logits = self.logits(params, inputs, seg)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
        w = (selected & (seg > 0)).astype(jnp.float32) * batch["weights"][:, None].astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(correct * w), jnp.sum(w)

    def loss(self, params, batch, rng):
        nll, correct, n = self._masked(params, batch, rng)
        n1 = jnp.maximum(n, 1.0)
        return nll / n1, {"accuracy": correct / n1, "masked": n}

    def eval_step(self, params, batch, rng):
        nll, correct, n = self._masked(params, batch, rng)
        return {"loss": (nll, n), "accuracy": (correct, n)}


# ---------------------------------------------------------------- chains -> packed rows


def pack_chains(chains, seq_len: int) -> dict:
    """{'tokens', 'segment_ids'} (N, seq_len) int32 plus counts: each chain framed and packed greedily in
    order; chains over seq_len - 2 residues cut into framed pieces (counted in 'pieces_cut')."""
    if seq_len < 3:
        raise ValueError(f"seq_len={seq_len}; expected at least 3 (<cls>, a residue, <eos>)")
    rows, row, cut, unknown = [], [], 0, 0
    for i, seq in enumerate(chains):
        if not isinstance(seq, str) or not seq:
            raise ValueError(f"chain {i} is {seq!r}; expected a non-empty string of residue letters")
        ids, unk = proteins.encode(seq)
        unknown += unk
        width = seq_len - 2
        pieces = [ids[j:j + width] for j in range(0, len(ids), width)]
        cut += len(pieces) > 1
        for p in pieces:
            framed = [proteins.CLS] + p + [proteins.EOS]
            if sum(len(x) for x in row) + len(framed) > seq_len:
                rows.append(row)
                row = []
            row.append(framed)
    if row:
        rows.append(row)
    tokens = np.full((len(rows), seq_len), proteins.PAD, np.int32)
    seg = np.zeros((len(rows), seq_len), np.int32)
    for r, pieces in enumerate(rows):
        at = 0
        for s, p in enumerate(pieces, 1):
            tokens[r, at:at + len(p)], seg[r, at:at + len(p)] = p, s
            at += len(p)
    return {"tokens": tokens, "segment_ids": seg, "chains_cut": cut, "unknown": unknown}


def split_chains(records, valid_fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, valid) unique sequences from [(group, sequence)]: a group (a PDB id) is held out when the
    hash of (seed, group) falls below valid_fraction; a sequence is held out only when every group it
    appears in is, so no chain is in both. Both lists sorted (deterministic)."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction}; expected a fraction strictly between 0 and 1")
    held = lambda g: int(hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()[:12], 16) / 16 ** 12 < valid_fraction
    in_train = {}
    for group, seq in records:
        in_train[seq] = in_train.get(seq, False) or not held(group)
    train = sorted(s for s, t in in_train.items() if t)
    valid = sorted(s for s, t in in_train.items() if not t)
    if not train or not valid:
        raise ValueError(f"{len(in_train)} unique chains in {len({g for g, _ in records})} groups split into "
                         f"{len(train)} train and {len(valid)} held-out; need both (more data or another "
                         "valid_fraction)")
    return train, valid


def unigram(train_tokens: np.ndarray) -> np.ndarray:
    """Residue frequencies (V,) of the training rows, add-one smoothed over the maskable ids, 0 elsewhere."""
    ids = train_tokens[maskable(train_tokens)]
    counts = np.bincount(ids, minlength=len(proteins.ALPHABET)).astype(np.float64)
    counts[MASKABLE_LO:MASKABLE_HI + 1] += 1.0
    return counts / counts.sum()
