import pytest

from experiments import kge
from experiments.configs import glyph as glyph_configs, kge as kge_configs, lexinvariant as lex_configs
from jaxemb.train import core_config, trainer
from jaxemb.train.optim import make_optimizer
from jaxemb.train.validate import COMPUTE_DTYPES, OPTIMIZERS, SCHEDULES, validate_core_config, \
    validate_transformer


def _set(cfg, key, value):
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    return cfg


# the bad settings of issue 18 item 5, and more of their kind
CORE_BAD = [
    ("train.steps", 0), ("train.steps", -5), ("optim.lr", -1.0), ("train.checkpoint_every", -3),
    ("train.keep_checkpoints", 0), ("train.batch_size", 0), ("train.batch_size", -4), ("train.accum_steps", 0),
    ("train.log_every", 0), ("train.eval_every", -1), ("train.eval_batches", 0), ("train.steps", 2.5),
    ("train.steps", True), ("train.compute_dtype", "float8"), ("train.best_mode", "up"),
    ("optim.end_lr", -1e-4), ("optim.lr", float("nan")), ("optim.lr", float("inf")), ("optim.weight_decay", -0.1),
    ("optim.clip_norm", -1.0), ("optim.b1", 1.0), ("optim.b2", -0.1), ("optim.eps", 0.0),
    ("optim.warmup_steps", -1), ("optim.name", "lion"), ("optim.schedule", "step"), ("optim.decay_rate", 0.0),
    ("mesh.num_devices", -1), ("seed", 1.5),
]


@pytest.mark.parametrize("key,value", CORE_BAD)
def test_bad_core_setting_is_refused_naming_key_and_value(key, value):
    cfg = _set(core_config(), key, value)
    with pytest.raises(ValueError) as err:
        validate_core_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{key}={value!r}: expected") and "\n" not in msg


def test_cross_key_checks():
    cfg = core_config()
    cfg.train.update(batch_size=12, accum_steps=5)
    with pytest.raises(ValueError, match=r"^train\.batch_size=12: expected a multiple of train\.accum_steps=5"):
        validate_core_config(cfg)
    cfg = core_config()
    cfg.optim.update(schedule="exponential", decay_steps=0)
    with pytest.raises(ValueError, match=r"^optim\.decay_steps=0: expected an integer >= 1 with optim\.schedule"):
        validate_core_config(cfg)
    for shape, key in ((dict(data=-1, fsdp=-1), "mesh.shape"), (dict(data=0), "mesh.shape.data"),
                       (dict(data=2, pipe=2), "mesh.shape.pipe")):
        cfg = core_config()
        cfg.mesh.shape = shape
        with pytest.raises(ValueError, match=rf"^{key}="):
            validate_core_config(cfg)


def test_zero_means_off_where_the_core_says_so():
    cfg = core_config()
    cfg.train.update(eval_every=0, checkpoint_every=0)
    cfg.optim.update(clip_norm=0.0, warmup_steps=0, weight_decay=0.0, lr=0.0, b1=0.0)
    cfg.mesh.num_devices = 0
    validate_core_config(cfg)


def test_names_agree_with_what_the_core_accepts():
    assert set(COMPUTE_DTYPES) == set(trainer._DTYPES)
    for name in OPTIMIZERS:
        for schedule in SCHEDULES:
            cfg = core_config().optim
            cfg.update(name=name, schedule=schedule, decay_steps=10)
            make_optimizer(cfg, 100)
    cfg = core_config().optim
    cfg.name = "lion"
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer(cfg, 100)


def _transformer():
    return lex_configs.get_config("tiny").model


MODEL_BAD = [("head_dim", 15, "model.head_dim=15: expected an even number with model.position='rope'"),
             ("num_heads", 0, "model.num_heads=0: expected an integer >= 1"),
             ("d_model", 0, "model.d_model=0: expected an integer >= 1"),
             ("num_layers", -1, "model.num_layers=-1"), ("mlp_dim", 0, "model.mlp_dim=0"),
             ("vocab_size", 0, "model.vocab_size=0"), ("head_dim", 0, "model.head_dim=0"),
             ("position", "alibi", "model.position='alibi': expected one of"),
             ("query_blocks", -2, "model.query_blocks=-2")]


@pytest.mark.parametrize("key,value,start", MODEL_BAD)
def test_bad_transformer_size_is_refused_naming_key(key, value, start):
    m = _transformer()
    with m.ignore_type():
        m[key] = value
    with pytest.raises(ValueError) as err:
        validate_transformer(m)
    assert str(err.value).startswith(start)


def test_transformer_check_reads_only_present_keys():
    m = _transformer()
    m.update(position="t5", head_dim=15)  # odd head_dim is fine without RoPE
    validate_transformer(m)
    validate_transformer({"d_model": 8})  # a section with few keys
    with pytest.raises(ValueError, match=r"^enc\.d_model=0"):
        validate_transformer({"d_model": 0}, name="enc")
    validate_transformer(object())  # an object without any of the keys: nothing to check


def _kge_as_trained(cfg):
    """Every model of a KGE config as experiments.kge.setup hands it to the Trainer (step counts derived
    from the epochs; 3 steps per epoch stands in for the dataset's)."""
    out = []
    for name in cfg.study.models:
        c = kge.model_config(cfg, name, [])
        c.train.steps = c.study.epochs * 3
        c.train.eval_every = c.study.eval_every_epochs * 3
        c.optim.decay_steps = 3
        out.append(c)
    return out


def _shipped():
    for name in ("default", "tiny", "paper"):
        yield f"lexinvariant:{name}", lex_configs.get_config(name), True
        yield f"glyph:{name}", glyph_configs.get_config(name), True
    kge_names = ["default", "tiny", "paper", "cpu-wn18rr"] + [
        f"paper-{d.lower()}-{m}" for d, m in kge_configs.PAPER]
    for name in kge_names:
        for c in _kge_as_trained(kge_configs.get_config(name)):
            yield f"kge:{name}:{c.model.name}", c, False


def test_every_shipped_config_passes():
    seen = 0
    for label, cfg, transformer in _shipped():
        try:
            validate_core_config(cfg)
            if transformer:
                validate_transformer(cfg.model)
        except ValueError as e:
            raise AssertionError(f"{label}: {e}") from None
        seen += 1
    assert seen > 30
