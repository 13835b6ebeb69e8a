"""Up-front checks of config settings, so a bad value fails at once with one line naming the key, the value
and what is expected, instead of training nothing or failing deep inside a step.

`validate_core_config(cfg)` checks the training core's sections (seed, train, optim, mesh; see defaults.py).
`validate_transformer(model_cfg)` checks the Transformer sizes a model section carries; it reads only the
keys that are present, so any model section (ConfigDict, dict or dataclass) can be passed.
Zero means "off" only where the core treats it so: train.eval_every, train.checkpoint_every (then only
the last step is saved), optim.clip_norm, optim.warmup_steps, optim.weight_decay, mesh.num_devices.
"""
from __future__ import annotations

import math
import numbers

from jaxemb.train.mesh import MESH_AXES

# the names optim.make_optimizer / make_schedule and the Trainer accept
OPTIMIZERS = ("adamw", "adam", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "exponential")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
POSITIONS = ("rope", "t5", "none")

_MISSING = object()


def _get(section, key):
    if isinstance(section, dict) or hasattr(section, "keys"):
        return section[key] if key in section else _MISSING
    return getattr(section, key, _MISSING)


def _fail(key, value, expected):
    raise ValueError(f"{key}={value!r}: expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _count(section, name, key, minimum=1, what=""):
    """An integer >= minimum (1: a count; 0: a count where 0 means off). Returns the value or _MISSING."""
    v = _get(section, key)
    if v is not _MISSING and not (_is_int(v) and v >= minimum):
        _fail(f"{name}.{key}", v, f"an integer >= {minimum}{what}")
    return v


def _rate(section, name, key, low=0.0, low_open=False, high=None, what=""):
    """A finite number in [low, high) (or (low, high) with low_open)."""
    v = _get(section, key)
    if v is _MISSING:
        return v
    ok = _is_real(v) and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        lo = f"({low}" if low_open else f"[{low}"
        hi = f"{high})" if high is not None else "inf)"
        _fail(f"{name}.{key}", v, f"a finite number in {lo}, {hi}{what}")
    return v


def _choice(section, name, key, options):
    v = _get(section, key)
    if v is not _MISSING and v not in options:
        _fail(f"{name}.{key}", v, "one of " + ", ".join(repr(o) for o in options))
    return v


def _flag(section, name, key):
    v = _get(section, key)
    if v is not _MISSING and not isinstance(v, bool):
        _fail(f"{name}.{key}", v, "True or False")


def validate_train(t, name="train"):
    _count(t, name, "steps", 1, " (training steps)")
    batch = _count(t, name, "batch_size", 1, " (examples per step)")
    accum = _count(t, name, "accum_steps", 1, " (micro-batches per step; 1 = no accumulation)")
    if batch is not _MISSING and accum is not _MISSING and batch % accum:
        _fail(f"{name}.batch_size", batch, f"a multiple of {name}.accum_steps={accum}")
    _choice(t, name, "compute_dtype", COMPUTE_DTYPES)
    _count(t, name, "log_every", 1, " (steps between train-metric records)")
    _count(t, name, "eval_every", 0, " (steps between evaluations; 0 = off)")
    _count(t, name, "eval_batches", 1, " (batches per evaluation)")
    _count(t, name, "checkpoint_every", 0, " (steps between checkpoints; 0 = only the last step)")
    # the last step is always saved, so there is always something to keep
    _count(t, name, "keep_checkpoints", 1, " (checkpoints kept; 0 would leave nothing to resume from)")
    for key in ("async_checkpoints", "progress", "guard_nonfinite"):
        _flag(t, name, key)
    metric = _get(t, "best_metric")
    if metric is not _MISSING and not isinstance(metric, str):
        _fail(f"{name}.best_metric", metric, "an eval metric name, or '' for none")
    _choice(t, name, "best_mode", ("max", "min"))
    _choice(t, name, "on_config_change", ("refuse", "extend", "fresh"))


def validate_optim(o, name="optim"):
    _choice(o, name, "name", OPTIMIZERS)
    schedule = _choice(o, name, "schedule", SCHEDULES)
    _rate(o, name, "lr")
    _rate(o, name, "end_lr")
    _count(o, name, "warmup_steps", 0, " (0 = no warm-up)")
    _rate(o, name, "b1", high=1.0)
    _rate(o, name, "b2", high=1.0)
    _rate(o, name, "eps", low_open=True)
    _rate(o, name, "weight_decay")
    _rate(o, name, "clip_norm", what=" (0 = no clipping)")
    decay_steps = _count(o, name, "decay_steps", 0)
    if schedule == "exponential" and decay_steps is not _MISSING and decay_steps < 1:
        _fail(f"{name}.decay_steps", decay_steps, f"an integer >= 1 with {name}.schedule='exponential'")
    _rate(o, name, "decay_rate", low_open=True)


def validate_mesh(m, name="mesh"):
    shape = _get(m, "shape")
    if shape is not _MISSING:
        if not hasattr(shape, "items"):
            _fail(f"{name}.shape", shape, f"a dict of axis sizes over {MESH_AXES}")
        for axis, size in shape.items():
            if axis not in MESH_AXES:
                _fail(f"{name}.shape.{axis}", size, f"no such axis; the axes are {', '.join(MESH_AXES)}")
            if not (_is_int(size) and (size >= 1 or size == -1)):
                _fail(f"{name}.shape.{axis}", size, "an integer >= 1, or -1 for the remaining devices")
        if sum(1 for s in shape.values() if s == -1) > 1:
            _fail(f"{name}.shape", dict(shape), "at most one axis of size -1")
    _count(m, name, "num_devices", 0, " (0 = all devices)")


def validate_core_config(cfg):
    """Raises ValueError naming the first bad setting of cfg's seed, train, optim and mesh sections."""
    seed = _get(cfg, "seed")
    if seed is not _MISSING and not _is_int(seed):
        _fail("seed", seed, "an integer")
    for section, check in (("train", validate_train), ("optim", validate_optim), ("mesh", validate_mesh)):
        value = _get(cfg, section)
        if value is not _MISSING:
            check(value, section)


def validate_transformer(model_cfg, name="model"):
    """Checks the shared Transformer sizes of a model section: vocab_size, d_model, num_layers, num_heads,
    head_dim, mlp_dim > 0, position known, head_dim even with RoPE (it rotates pairs of dimensions)."""
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim", "mlp_dim"):
        _count(model_cfg, name, key, 1)
    position = _choice(model_cfg, name, "position", POSITIONS)
    head_dim = _get(model_cfg, "head_dim")
    if position == "rope" and head_dim is not _MISSING and head_dim % 2:
        _fail(f"{name}.head_dim", head_dim, f"an even number with {name}.position='rope'")
    _count(model_cfg, name, "query_blocks", 0, " (0 = auto)")
