"""Optimizer and learning-rate schedule from config (optax)."""
from __future__ import annotations

import optax


def make_schedule(cfg, total_steps: int):
    """cfg: lr, end_lr, warmup_steps, schedule in {'cosine', 'linear', 'constant'}."""
    warmup = int(cfg.warmup_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr / cfg.lr if cfg.lr else 0.0)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, cfg.end_lr, decay_steps)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; expected 'cosine', 'linear' or 'constant'")
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, cfg.lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(cfg, total_steps: int):
    """Returns (optax transformation, schedule). cfg.name in {'adamw', 'adafactor', 'sgd'}."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
    elif cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.b1 or None)
    else:
        raise ValueError(f"optim.name={cfg.name!r}; expected 'adamw', 'adafactor' or 'sgd'")
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(opt)
    return optax.chain(*parts), schedule
