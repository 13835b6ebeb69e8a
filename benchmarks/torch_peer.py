"""The same LM written plainly in PyTorch: the peer a user would otherwise pick (benchmark only).

Matches jaxemb's standard LM: pre-LN, causal, RoPE or T5 relative bias, bias-free projections, tanh-GELU
MLP, tied readout scaled by d^-1/2, AdamW or Adafactor with global-norm clipping.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rope(x, base=10000.0):
    b, h, l, d = x.shape
    half = d // 2
    freq = 1.0 / base ** (torch.arange(half, dtype=torch.float32) / half)
    ang = torch.arange(l, dtype=torch.float32)[:, None] * freq
    sin, cos = ang.sin(), ang.cos()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def t5_buckets(length, num_buckets=32, max_distance=128):
    pos = torch.arange(length)
    n = (pos[:, None] - pos[None, :]).clamp(min=0)
    exact = num_buckets // 2
    large = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    return torch.where(n < exact, n, large.clamp(max=num_buckets - 1))


class Block(nn.Module):
    def __init__(self, d, heads, head_dim, mlp):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, d, bias=False)
        self.wi, self.wo = nn.Linear(d, mlp, bias=False), nn.Linear(mlp, d, bias=False)

    def forward(self, x, bias, use_rope):
        b, l, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if use_rope:
            q, k = rope(q), rope(k)
        if bias is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.out(a.transpose(1, 2).reshape(b, l, -1))
        return x + self.wo(F.gelu(self.wi(self.ln2(x)), approximate="tanh"))


class LM(nn.Module):
    def __init__(self, vocab, d, layers, heads, head_dim, mlp, position="rope"):
        super().__init__()
        self.d, self.position, self.heads = d, position, heads
        self.embed = nn.Parameter(torch.randn(vocab, d))
        self.blocks = nn.ModuleList([Block(d, heads, head_dim, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        if position == "t5":
            self.rel = nn.Parameter(torch.randn(32, heads) * 0.02)

    def forward(self, tokens, targets):
        l = tokens.shape[1]
        x = F.embedding(tokens, self.embed)
        bias = None
        if self.position == "t5":
            causal = torch.ones(l, l, dtype=torch.bool).tril()
            bias = self.rel[t5_buckets(l)].permute(2, 0, 1).masked_fill(~causal, float("-inf"))[None]
        for blk in self.blocks:
            x = blk(x, bias, self.position == "rope")
        logits = self.ln(x) @ self.embed.t() * self.d ** -0.5
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def make(cfg_model, optim_cfg):
    m = cfg_model
    model = LM(m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim, m.position)
    if optim_cfg.name == "adafactor":
        opt = torch.optim.Adafactor(model.parameters(), lr=optim_cfg.lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2),
                                eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
    return model, opt


def train_step(model, opt, tokens, targets, clip):
    opt.zero_grad(set_to_none=True)
    loss = model(tokens, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss
