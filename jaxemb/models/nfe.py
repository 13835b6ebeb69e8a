"""Knowledge-graph embedding by normalizing flows (NFE; Xiao, He, Cao, AAAI 2023) and baselines.

An entity is a vector of random variables with location mu and scale sigma; a relation (r_mu, r_sigma) maps
the head by the affine flow mu_1 = r_sigma * h_mu + r_mu, sigma_1 = r_sigma * h_sigma, and the score says how
close the flowed head distribution is to the tail's:

  nfe1       gamma - (||mu_1 - t_mu||^2 + || |sigma_1| - |t_sigma| ||^2)          (2-Wasserstein, Gaussians)
  nfe2       two-piece normal: entity scales (sigma_a, sigma_b), s_a = |r_sigma h_sigma_a|, s_b likewise;
             gamma - [||d_mu||^2 + ||d_a||^2 / 2 + ||d_b||^2 / 2 + sqrt(2/pi) d_mu . (d_b - d_a)]
  nfe3       gamma - KL(N(mu_1, sigma_1^2) || N(t_mu, t_sigma^2)), sigma_1 = softplus(r_sigma) softplus(h_sigma),
             t_sigma = softplus(t_sigma) (mu_1 uses the raw r_sigma, as the reference code)
  nfe_mu     gamma - ||mu_1 - t_mu||^2                     (ablation: no uncertainty)
  nfe_sigma  gamma - || |r_sigma h_sigma| - |t_sigma| ||^2   (ablation: scales only)
  transe     gamma - ||h + r - t||^2                       (the paper's "NFE-1 mu" row)
  distmult   <h, r, t>
  complex    Re<h, r, conj(t)>                             (trained with the N3 regulariser)

Every score against all N entities is `bq[:, None] + sum_i q_i @ k_i.T + bk[None, :]` with query parts
(q_i (B, d), bq) from (head, relation) and key parts (k_i (N, d), bk) computed elementwise from the entity
table: (B, d) x (d, N) products, never a (B, N, d) tensor. The entity table is a tuple of parts, each its
own (N, d) array with logical axes ('entities', None) (separate arrays: no slicing copies of the big table);
the relation table is (parts, 2R, d), replicated. The 1-vs-all loss has a hand-written backward pass
(`one_vs_all_loss`) that keeps the score gradient from the forward pass and forms every reduction over the
short batch axis as a product (XLA:CPU's column sums of a (B, N) array ran 50x slower than a matvec).
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

# model -> (entity parts, relation parts), each part `dim` wide
PARTS = {"nfe1": (2, 2), "nfe2": (3, 2), "nfe3": (2, 2), "nfe_mu": (1, 2), "nfe_sigma": (1, 1),
         "transe": (1, 1), "distmult": (1, 1), "complex": (2, 2)}
_C = (2 / jnp.pi) ** 0.5


def _sq(x):
    return jnp.sum(x * x, axis=-1)


def query_part(model: str, h, r, gamma: float):
    """Head parts h (Pe, B, d) and relation parts r (Pr, B, d) -> q: list of (B, d), bq (B,)."""
    if model in ("nfe1", "nfe_mu", "nfe_sigma", "transe"):
        if model == "transe":
            q = [h[0] + r[0]]
        elif model == "nfe_sigma":
            q = [jnp.abs(r[0] * h[0])]
        else:
            q = [r[1] * h[0] + r[0]]  # mu_1 = r_sigma * h_mu + r_mu
            if model == "nfe1":
                q.append(jnp.abs(r[1] * h[1]))
        return [2 * x for x in q], gamma - sum(_sq(x) for x in q)  # gamma - |q|^2 + 2 q.k - |k|^2
    if model == "nfe2":
        mu, sa, sb = r[1] * h[0] + r[0], jnp.abs(r[1] * h[1]), jnp.abs(r[1] * h[2])
        return [mu, sa, sb], gamma - (_sq(mu) + _sq(sa) / 2 + _sq(sb) / 2 + _C * jnp.sum(mu * (sb - sa), -1))
    if model == "nfe3":
        mu, s = r[1] * h[0] + r[0], jax.nn.softplus(r[1]) * jax.nn.softplus(h[1])
        return [s * s + mu * mu, mu], gamma + jnp.sum(jnp.log(s), -1) + mu.shape[-1] / 2
    if model == "distmult":
        return [h[0] * r[0]], jnp.zeros(h.shape[1:2], h.dtype)
    if model == "complex":
        (hr, hi), (rr, ri) = h, r
        return [hr * rr - hi * ri, hr * ri + hi * rr], jnp.zeros(h.shape[1:2], h.dtype)
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(PARTS)}")


def key_part(model: str, t):
    """Entity table parts t (a sequence of Pe arrays (N, d)) -> k: list of (N, d), bk (N,). Each part stays
    a separate array (no slicing or concatenation of the big table: on CPU those copies cost more than the
    matmul)."""
    if model in ("nfe1", "nfe_mu", "nfe_sigma", "transe"):
        k = [jnp.abs(t[0])] if model == "nfe_sigma" else [t[0]]
        if model == "nfe1":
            k.append(jnp.abs(t[1]))
        return k, -sum(_sq(x) for x in k)
    if model == "nfe2":
        mu, a, b = t[0], jnp.abs(t[1]), jnp.abs(t[2])
        k = [2 * mu + _C * (b - a), a - _C * mu, b + _C * mu]
        return k, -(_sq(mu) + _sq(a) / 2 + _sq(b) / 2 + _C * jnp.sum(mu * (b - a), -1))
    if model == "nfe3":
        mu, s = t[0], jax.nn.softplus(t[1])
        inv = 1.0 / (s * s)
        # KL = sum log s_t - log s_1 + (s_1^2 + mu_1^2) / (2 s_t^2) - mu_1 mu_t / s_t^2 + mu_t^2 / (2 s_t^2) - 1/2
        return [-inv / 2, mu * inv], -(jnp.sum(jnp.log(s), -1) + jnp.sum(mu * mu * inv, -1) / 2)
    if model in ("distmult", "complex"):
        return list(t), jnp.zeros(t[0].shape[:1], t[0].dtype)
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(PARTS)}")


def n3(model: str, *rows):
    """N3 regulariser (Lacroix et al. 2018): sum of |x|^3 over the rows' coordinates (complex moduli for
    ComplEx). rows: arrays (P, B, d). Returns (B,)."""
    total = 0.0
    for x in rows:
        if model == "complex":
            x = jnp.sqrt(x[0] * x[0] + x[1] * x[1])[None]
        total = total + jnp.sum(jnp.abs(x) ** 3, (0, 2))
    return total


def _ova_scores(q, bq, k, bk, num_valid: int):
    s = bq[:, None] + bk[None, :]
    for qi, ki in zip(q, k):
        s = s + qi @ ki.T
    s = nn.with_logical_constraint(s, (None, "entities"))
    if num_valid < s.shape[1]:  # padded entity rows never score
        s = jnp.where(jnp.arange(s.shape[1]) < num_valid, s, -1e30)
    return s


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def one_vs_all_loss(q, bq, k, bk, tail, num_valid: int, loss: str):
    """Per-query loss of the tail against all entities, scores s = bq + bk + sum_i q_i k_i^T.

    'logistic': sum over entities of softplus(-y s) (y = +1 at the tail, -1 elsewhere); 'softmax':
    logsumexp(s) - s_tail. q, k: lists of (B, d) and (N, d); bq (B,), bk (N,); tail (B,) int. Only the first
    num_valid entities count. Returns (B,). The backward pass reuses dL/ds = sigmoid(s) - y (or softmax - y)
    saved by the forward pass: dq_i = G k_i, dk_i = G^T q_i, dbq = G 1, dbk = 1^T G.
    """
    return _ova_fwd(q, bq, k, bk, tail, num_valid, loss)[0]


def _ova_fwd(q, bq, k, bk, tail, num_valid, loss):
    s = _ova_scores(q, bq, k, bk, num_valid)
    target = jnp.take_along_axis(s, tail[:, None], 1)[:, 0]
    if loss == "logistic":  # softplus(-s) at the tail, softplus(s) elsewhere
        per = jnp.sum(jax.nn.softplus(s), 1) - jax.nn.softplus(target) + jax.nn.softplus(-target)
        g = jax.nn.sigmoid(s)
    else:
        lse = jax.nn.logsumexp(s, 1)
        per, g = lse - target, jnp.exp(s - lse[:, None])
    return per, (g, q, k, tail)


def _ova_bwd(num_valid, loss, res, ct):
    g, q, k, tail = res
    g = g.at[jnp.arange(g.shape[0]), tail].add(-1.0) * ct[:, None].astype(g.dtype)
    column_sums = jnp.ones((g.shape[0],), g.dtype) @ g  # not jnp.sum(g, 0): see the module docstring
    return [g @ ki for ki in k], jnp.sum(g, 1), [g.T @ qi for qi in q], column_sums, None


one_vs_all_loss.defvjp(_ova_fwd, _ova_bwd)


def _uniform(scale):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


def filtered_rank(scores, tail, others, ties: str = "mean"):
    """Filtered rank of each query's true tail.

    scores (B, N); tail (B,) int; others (B, K) other known true tails, -1 padded. Entities scoring above
    the tail count fully; ties (other entities with exactly the tail's score) count by `ties`:
    'mean' (default) = mean of optimistic and pessimistic rank, 'pessimistic' = all, 'optimistic' = none.
    A non-finite tail score ranks last (N = scores.shape[1]). Returns (B,) float32.
    """
    target = jnp.take_along_axis(scores, tail[:, None], 1)
    above = jnp.sum(scores > target, 1)
    equal = jnp.sum(scores == target, 1) - 1
    valid = others >= 0
    known = jnp.take_along_axis(scores, jnp.maximum(others, 0), 1)
    above -= jnp.sum(valid & (known > target), 1)
    equal -= jnp.sum(valid & (known == target), 1)
    weight = {"mean": 0.5, "pessimistic": 1.0, "optimistic": 0.0}[ties]
    rank = 1.0 + above + weight * equal
    return jnp.where(jnp.isfinite(target[:, 0]), rank, scores.shape[1]).astype(jnp.float32)


class KGETask:
    """1-vs-all training of one model on the training core.

    cfg: name, dim, gamma, init_scale, loss ('logistic': sum over entities of softplus(-y s), as the reference
    code; or 'softmax': cross-entropy over entities), n3 (regulariser weight), ties (ranking).
    Batches: head, rel, tail (B,) int32, weights (B,) float32 (0 for padding), filter (B, K) for ranking.
    """

    tokens_per_example = 1

    def __init__(self, cfg, num_entities: int, num_relations: int, pad_multiple: int | None = None):
        if cfg.name not in PARTS:
            raise ValueError(f"model.name={cfg.name!r}; expected one of {', '.join(PARTS)}")
        if cfg.loss not in ("logistic", "softmax"):
            raise ValueError(f"model.loss={cfg.loss!r}; expected 'logistic' or 'softmax'")
        self.cfg, self.num_entities, self.num_relations = cfg, num_entities, num_relations
        # The entity table is padded to a multiple of the device count so that it shards evenly over any mesh;
        # padded rows score -1e30 (never above a true tail, no loss, no gradient).
        m = pad_multiple or jax.device_count()
        self.table_rows = -(-num_entities // m) * m
        self.rank_step = self._rank_step  # one stable function object, so jit compiles it once

    def init(self, rng, batch):
        pe, pr = PARTS[self.cfg.name]
        ke, kr = jax.random.split(rng)
        init = _uniform(self.cfg.init_scale)
        ent = tuple(nn.with_logical_partitioning(init, ("entities", None))(key, (self.table_rows, self.cfg.dim))
                    for key in jax.random.split(ke, pe))
        rel = nn.with_logical_partitioning(init, (None, None, None))(kr, (pr, self.num_relations, self.cfg.dim))
        return {"entity": ent, "relation": rel}

    @staticmethod
    def _entity_rows(params, ids):
        """(Pe, B, d) rows of every entity part."""
        return jnp.stack([x[ids] for x in params["entity"]])

    def _parts(self, params, head, rel):
        h = self._entity_rows(params, head)
        q, bq = query_part(self.cfg.name, h, params["relation"][:, rel], self.cfg.gamma)
        k, bk = key_part(self.cfg.name, params["entity"])
        return q, bq, k, bk

    def scores(self, params, head, rel):
        """(B,) heads and relations -> (B, N') scores against every entity (N' = table_rows >= N)."""
        return _ova_scores(*self._parts(params, head, rel), self.num_entities)

    def loss(self, params, batch, rng):
        q, bq, k, bk = self._parts(params, batch["head"], batch["rel"])
        per = one_vs_all_loss(q, bq, k, bk, batch["tail"], self.num_entities, self.cfg.loss)
        w = batch["weights"]
        count = jnp.maximum(jnp.sum(w), 1.0)
        nll = jnp.sum(w * per) / count
        reg = jnp.zeros(())
        if self.cfg.n3:
            rows = (self._entity_rows(params, batch["head"]), params["relation"][:, batch["rel"]],
                    self._entity_rows(params, batch["tail"]))
            reg = self.cfg.n3 * jnp.sum(w * n3(self.cfg.name, *rows)) / count
        return nll + reg, {"nll": nll, "n3": reg}

    def _rank_step(self, params, batch, rng):
        s = self.scores(params, batch["head"], batch["rel"])
        rank = filtered_rank(s, batch["tail"], batch["filter"], self.cfg.ties)
        return jnp.minimum(rank, self.num_entities)


def parameter_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
