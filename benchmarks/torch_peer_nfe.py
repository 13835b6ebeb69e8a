"""NFE-1 1-vs-all training written plainly in PyTorch, as the reference code computes it (benchmark only).

The computation of github.com/changyi7231/NFE (model.py, main.py) for NFE-1: entity rows [mu | sigma] and
relation rows [r_mu | r_sigma] in single embedding tables, uniform(-0.1, 0.1) init; for a batch of (head,
relation) the flowed head mu_1 = r_sigma * h_mu + r_mu, sigma_1 = |r_sigma * h_sigma| is scored against every
entity as gamma - (||mu_1 - t_mu||^2 + ||sigma_1 - |t_sigma| ||^2), expanded into matmuls; the loss is the
batch mean of the sum over entities of softplus(-y s) (y = +1 at the true tail, -1 elsewhere); Adam.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NFE1(nn.Module):
    def __init__(self, num_entities: int, num_relations: int, dim: int, gamma: float, init_scale: float = 0.1,
                 dtype=torch.float32):
        super().__init__()
        self.gamma = gamma
        self.entity = nn.Embedding(num_entities, 2 * dim, dtype=dtype)
        self.relation = nn.Embedding(num_relations, 2 * dim, dtype=dtype)
        nn.init.uniform_(self.entity.weight, -init_scale, init_scale)
        nn.init.uniform_(self.relation.weight, -init_scale, init_scale)

    def forward(self, heads, relations):
        """(B,) heads and relations -> (B, N) scores against every entity."""
        h_mu, h_sigma = self.entity(heads).chunk(2, dim=-1)
        r_mu, r_sigma = self.relation(relations).chunk(2, dim=-1)
        t_mu, t_sigma = self.entity.weight.chunk(2, dim=-1)
        mu1, sigma1, sigma2 = r_sigma * h_mu + r_mu, (r_sigma * h_sigma).abs(), t_sigma.abs()

        def sq_dist(a, b):  # ||a_i - b_j||^2 for all i, j
            return a.pow(2).sum(-1, keepdim=True) - 2 * a @ b.t() + b.pow(2).sum(-1)[None]

        return self.gamma - (sq_dist(mu1, t_mu) + sq_dist(sigma1, sigma2))


def loss_fn(scores, tails):
    sign = torch.ones_like(scores).scatter(1, tails[:, None], -1.0)  # -1 at the tail: softplus(-s) there
    return F.softplus(sign * scores).sum(-1).mean()


def make(num_entities: int, num_relations: int, dim: int, gamma: float, lr: float, dtype=torch.float32):
    model = NFE1(num_entities, num_relations, dim, gamma, dtype=dtype)
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def train_step(model, opt, heads, relations, tails) -> float:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(heads, relations), tails)
    loss.backward()
    opt.step()
    return loss.item()
