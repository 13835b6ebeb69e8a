"""Optimizer and learning-rate schedule from config (optax)."""
from __future__ import annotations

import optax


def make_schedule(cfg, total_steps: int):
    """cfg: lr, end_lr, warmup_steps, schedule in {'cosine', 'linear', 'constant', 'exponential'};
    'exponential' multiplies the rate by decay_rate every decay_steps steps (e.g. once per epoch)."""
    warmup = int(cfg.warmup_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr / cfg.lr if cfg.lr else 0.0)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, cfg.end_lr, decay_steps)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "exponential":
        if cfg.decay_steps <= 0:
            raise ValueError(f"optim.decay_steps must be > 0 for the exponential schedule, got {cfg.decay_steps}")
        main = optax.exponential_decay(cfg.lr, transition_steps=cfg.decay_steps, decay_rate=cfg.decay_rate,
                                       staircase=True)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; expected 'cosine', 'linear', 'constant' or "
                         "'exponential'")
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, cfg.lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(cfg, total_steps: int, clip: bool = True, decay_mask=None):
    """Returns (optax transformation, schedule). cfg.name in {'adamw', 'adam', 'adafactor', 'sgd'}.
    With clip=False the chain leaves out clipping by cfg.clip_norm (the Trainer clips with the gradient
    norm it computes for its metrics anyway, so that the norm is not computed twice). decay_mask
    (params -> tree of bools) limits AdamW's weight decay to the True leaves (Task.decay)."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=decay_mask)
    elif cfg.name == "adam":
        opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
    elif cfg.name == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.b1 or None)
    else:
        raise ValueError(f"optim.name={cfg.name!r}; expected 'adamw', 'adam', 'adafactor' or 'sgd'")
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        # an identity in its place keeps the optimizer state's layout (and so checkpoints) the same
        parts.append(optax.clip_by_global_norm(cfg.clip_norm) if clip else optax.identity())
    parts.append(opt)
    return optax.chain(*parts), schedule
