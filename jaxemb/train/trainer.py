"""The one training core: sharded init, jit-compiled train step, evaluation, checkpoints and resume.

Every system in jaxemb trains through `Trainer`. The train step is `jax.jit` with in/out shardings over a
named Mesh and donation of the train state (the modern form of pjit). Parameters carry flax logical axis
names that the config's rules map to mesh axes; optimizer state follows its parameters' sharding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxemb.train import distributed
from jaxemb.train.checkpoint import Checkpointer, abstract_like, distributed_barrier
from jaxemb.train.constants import load_tree, place_tree
from jaxemb.train.mesh import BATCH_AXES, batch_sharding, data_parallel_size, make_mesh, replicated, \
    rules_from_config
from jaxemb.train.metrics import MetricsWriter, Progress
from jaxemb.train.optim import make_optimizer
from jaxemb.train.validate import validate_core_config
from jaxemb.train.workdir import RunLock, check_config

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class NonFiniteLoss(FloatingPointError):
    pass


@dataclasses.dataclass
class FitResult:
    """What `Trainer.fit` returns: the final train state, the step reached, seconds spent in this call's
    training loop, and the last logged train and eval metrics (host floats)."""
    state: dict
    steps: int
    train_seconds: float
    train_metrics: dict
    eval_metrics: dict


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _follow_params(opt_abstract, param_shardings, params_abstract, mesh):
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has that
    parameter's shape gets its sharding (Adam moments); anything else (counts, factored Adafactor
    statistics) is replicated."""
    by_path = {}
    for (path, s), a in zip(jax.tree_util.tree_flatten_with_path(param_shardings)[0],
                            jax.tree.leaves(params_abstract)):
        by_path[_path_key(path)] = (s, a.shape)

    def pick(path, leaf):
        key = _path_key(path)
        for k in range(len(key)):
            hit = by_path.get(key[k:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def _strip_boxes(tree):
    """Removes flax partitioning boxes without adding sharding constraints (works on abstract values)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _squared_norm(g):
    """sum(g * g) in float32, reduced over the last axis first: XLA:CPU fuses that into one pass, while a
    whole-array sum of squares first wrote g * g out (~10 ms per step on the NFE-1 WN18RR tables)."""
    g = g.reshape(-1, g.shape[-1]) if g.ndim else g.reshape(1, 1)
    return jnp.sum(jnp.sum(g * g, -1, dtype=jnp.float32))


class Trainer:
    """Trains `task` as `cfg` says. cfg sections: seed, mesh, rules, train, optim, distributed."""

    def __init__(self, task, cfg, workdir: str):
        validate_core_config(cfg)
        distributed.maybe_initialize(cfg.distributed)
        self.task, self.cfg, self.workdir = task, cfg, workdir
        self.mesh = make_mesh(dict(cfg.mesh.shape), cfg.mesh.num_devices)
        self.rules = rules_from_config(cfg.rules)
        t = cfg.train
        if t.batch_size % t.accum_steps:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.accum_steps="
                             f"{t.accum_steps}")
        dp = data_parallel_size(self.mesh)
        if (t.batch_size // t.accum_steps) % dp:
            raise ValueError(
                f"train.batch_size={t.batch_size} (micro-batch {t.batch_size // t.accum_steps} with "
                f"accum_steps={t.accum_steps}) is not divisible by the data-parallel size {dp} "
                f"(mesh data x fsdp = {self.mesh.shape['data']} x {self.mesh.shape['fsdp']})")
        if t.compute_dtype not in _DTYPES:
            raise ValueError(f"train.compute_dtype={t.compute_dtype!r}; expected one of {sorted(_DTYPES)}")
        decay = getattr(task, "decay", None)
        decay_mask = None if decay is None else (lambda ps: jax.tree_util.tree_map_with_path(
            lambda p, _: bool(decay(_path_key(p))), ps))
        self.tx, self.schedule = make_optimizer(cfg.optim, t.steps, clip=False,  # _step_fn clips
                                                decay_mask=decay_mask)
        self.clip_norm = float(cfg.optim.clip_norm or 0.0)
        frozen = getattr(task, "frozen", None)
        self._trainable = (lambda path: not frozen(_path_key(path))) if frozen is not None else None
        if frozen is not None:
            self.tx = optax.multi_transform(
                {"train": self.tx, "frozen": optax.set_to_zero()},
                lambda params: jax.tree_util.tree_map_with_path(
                    lambda p, _: "train" if self._trainable(p) else "frozen", params))
        self.is_main = jax.process_index() == 0
        self._train_step = self._eval_step = None
        self._mapped = {}  # fn -> jitted fn, for map_batches
        self.state_shardings = None
        self._constants = None  # placed on first use (Task.constants)

    # -- constants -------------------------------------------------------------------------------------

    @property
    def constants(self):
        """The task's constants (Task.constants), placed sharded on the mesh once; {} when it has none."""
        if self._constants is None:
            make = getattr(self.task, "constants", None)
            with self.context():
                self._constants = place_tree(make(), self.mesh, self.rules) if make is not None else {}
        return self._constants

    def _with_constants(self, fn):
        """fn(params, batch, rng) for tasks without constants; fn(..., constants=c) for tasks with them."""
        if getattr(self.task, "constants", None) is None:
            return lambda p, b, r, c: fn(p, b, r)
        return lambda p, b, r, c: fn(p, b, r, constants=c)

    def _const_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.constants)

    # -- contexts and placement ------------------------------------------------------------------------

    def context(self):
        """Mesh + logical-axis rules, active while tracing and running model code."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def batch_shardings(self, batch: dict) -> dict:
        return {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def put_batch(self, source, index: int) -> dict:
        """Batch `index` of `source` as global arrays; each process reads only its own rows."""
        probe = batch_sharding(self.mesh)
        rows = distributed.local_rows(probe, source.batch_size)
        local = source.get(index, rows)
        return distributed.make_global(local, self.batch_shardings(local), source.batch_size)

    # -- state -----------------------------------------------------------------------------------------

    def init_state(self, example_batch: dict):
        """Creates the sharded train state {'step', 'params', 'opt_state', 'rng'} from the seed."""
        root = jax.random.key(self.cfg.seed)
        init_rng, train_rng = jax.random.split(root)
        with self.context():
            boxed = jax.eval_shape(self.task.init, init_rng, example_batch)
            specs = nn.get_partition_spec(boxed)
            param_sh = nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)
            params_abs = _strip_boxes(boxed)
            opt_abs = jax.eval_shape(self.tx.init, params_abs)
            opt_sh = _follow_params(opt_abs, param_sh, params_abs, self.mesh)
            rep = replicated(self.mesh)
            self.state_shardings = {"step": rep, "params": param_sh, "opt_state": opt_sh, "rng": rep}

            def init_fn(rng, batch):
                params = nn.unbox(self.task.init(rng, batch))
                return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
                        "rng": jax.random.key_data(train_rng)}

            batch_sh = self.batch_shardings(example_batch)
            state = jax.jit(init_fn, in_shardings=(rep, batch_sh), out_shardings=self.state_shardings)(
                init_rng, example_batch)
            pretrained = getattr(self.task, "pretrained", None)
            for key, path in (pretrained() if pretrained is not None else {}).items():
                if key not in boxed:
                    raise KeyError(f"Task.pretrained() names params key {key!r}; the params have "
                                   f"{sorted(boxed)}")
                loaded = load_tree(path, boxed[key], self.mesh, self.rules)
                # Re-initialise the optimizer state for the loaded values (Adam moments start at zero anyway).
                params = dict(state["params"], **{key: loaded})
                opt = jax.jit(self.tx.init, out_shardings=opt_sh)(params)
                state = dict(state, params=params, opt_state=opt)
        return state

    # -- steps -----------------------------------------------------------------------------------------

    def _loss_fn(self, params, batch, rng, constants):
        if self._trainable is not None:  # frozen parameters: no gradient computed, no update applied
            params = jax.tree_util.tree_map_with_path(
                lambda p, x: x if self._trainable(p) else jax.lax.stop_gradient(x), params)
        dtype = _DTYPES[self.cfg.train.compute_dtype]
        if dtype != jnp.float32:
            params = _cast_floats(params, dtype)  # fp32 master params; gradients come back in fp32
            constants = _cast_floats(constants, dtype)
        loss, metrics = self._with_constants(self.task.loss)(params, batch, rng, constants)
        return loss.astype(jnp.float32), metrics

    def _step_fn(self, state, batch, constants):
        accum = self.cfg.train.accum_steps
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        grad_fn = jax.value_and_grad(self._loss_fn, has_aux=True)
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng, constants)
        else:
            # Row r of micro-batch i is global row r * accum + i: every device keeps its share.
            def split(x):
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                spec = P(None, BATCH_AXES, *([None] * (x.ndim - 2)))
                return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

            micro = jax.tree.map(split, batch)

            def body(carry, inp):
                i, mb = inp
                (l, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i), constants)
                return jax.tree.map(jnp.add, carry, (g, l, m)), None

            zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, constants))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ((zeros[1], zeros[0][0], zeros[0][1])))
            (grads, loss, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads, loss, metrics = jax.tree.map(lambda x: x / accum, (grads, loss, metrics))
        # Global norm of the gradients the optimizer uses (frozen parameters left out), computed once: it is
        # logged and it clips (one pass over the gradients saved: ~50 ms per 150M step on a 2-core CPU).
        trained = [g for p, g in jax.tree_util.tree_leaves_with_path(grads)
                   if self._trainable is None or self._trainable(p)]
        grad_norm = jnp.sqrt(sum(_squared_norm(g) for g in trained))
        if self.clip_norm > 0:
            scale = jnp.minimum(1.0, self.clip_norm / grad_norm)
            grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # fit() stops on a non-finite loss or gradient norm before it checkpoints that step, so by default
        # the step is not guarded. train.guard_nonfinite=True (for hand-written loops over train_step) keeps
        # params and optimizer state as they were instead; it costs an extra pass over both (NFE-1 WN18RR:
        # 221 vs 200 ms per step on a 2-core CPU).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.cfg.train.guard_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        else:
            keep = lambda new, old: new
        new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"]), "rng": state["rng"]}
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=self.schedule(state["step"]))
        return new_state, metrics

    def train_step(self, state, batch):
        """One optimizer step (with gradient accumulation); compiled once per batch structure."""
        constants = self.constants
        if self._train_step is None:
            self._train_step = jax.jit(
                self._step_fn, in_shardings=(self.state_shardings, self.batch_shardings(batch),
                                             self._const_shardings()),
                out_shardings=(self.state_shardings, replicated(self.mesh)), donate_argnums=(0,))
        with self.context():
            return self._train_step(state, batch, constants)

    def _default_eval(self, params, batch, rng, constants):
        loss, metrics = self._loss_fn(params, batch, rng, constants)
        w = jnp.sum(batch["weights"]).astype(jnp.float32) if "weights" in batch else \
            jnp.float32(jax.tree.leaves(batch)[0].shape[0])
        return {k: (v * w, w) for k, v in dict(metrics, loss=loss).items()}

    def eval_step(self, params, batch, rng):
        """{name: (sum, weight)} of one eval batch (Task.eval_step, or the weighted loss and metrics)."""
        constants = self.constants
        if self._eval_step is None:
            fn = getattr(self.task, "eval_step", None)
            fn = self._default_eval if fn is None else self._with_constants(fn)
            self._eval_step = jax.jit(fn, in_shardings=(self.state_shardings["params"],
                                                        self.batch_shardings(batch), replicated(self.mesh),
                                                        self._const_shardings()),
                                      out_shardings=replicated(self.mesh))
        with self.context():
            return self._eval_step(params, batch, rng, constants)

    def evaluate(self, params, source, num_batches: int) -> dict:
        """Exact eval metrics over the first `num_batches` batches of `source`: the task's sums and weights
        added in float64 over all batches, divided once (a metric with zero total weight is NaN)."""
        rng = jax.random.key(self.cfg.seed + 1)  # the same eval randomness every time
        sums, weights = {}, {}
        for i in range(num_batches):
            m = jax.device_get(self.eval_step(params, self.put_batch(source, i), jax.random.fold_in(rng, i)))
            for k, pair in m.items():
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                    raise TypeError(f"Task.eval_step must return {{name: (sum, weight)}}; {k!r} is {pair!r}")
                sums[k] = sums.get(k, 0.0) + float(np.asarray(pair[0], np.float64))
                weights[k] = weights.get(k, 0.0) + float(np.asarray(pair[1], np.float64))
        return {k: sums[k] / weights[k] if weights[k] else float("nan") for k in sums}

    def map_batches(self, fn, params, source, num_batches: int, seed: int = 1) -> list:
        """Runs jit(fn)(params, batch, rng) over batches 0..num_batches-1 of `source` with the trainer's
        shardings; returns the host (numpy) outputs, one per batch. For probes and per-position metrics."""
        if fn not in self._mapped:  # one compilation per fn (and batch shape) for the trainer's life
            self._mapped[fn] = jax.jit(self._with_constants(fn))
        jitted = self._mapped[fn]
        rng = jax.random.key(self.cfg.seed + seed)
        constants = self.constants
        outs = []
        with self.context():
            for i in range(num_batches):
                batch = self.put_batch(source, i)
                outs.append(jax.device_get(jitted(params, batch, jax.random.fold_in(rng, i), constants)))
        return outs

    # -- the loop --------------------------------------------------------------------------------------

    def fit(self, source, eval_source=None, desc: str = "train", eval_fn=None):
        """Trains to cfg.train.steps, resuming from the latest checkpoint in workdir/checkpoints.

        Every cfg.train.eval_every steps: the task's eval metrics over `eval_source` and/or
        `eval_fn(state) -> dict` (e.g. ranking metrics) are logged; with cfg.train.best_metric set, the
        state with the best value so far is kept in workdir/best (see `restore_best`).
        Returns a FitResult. Raises NonFiniteLoss naming the step if the loss becomes NaN/inf; the last
        good checkpoint stays on disk.
        """
        t = self.cfg.train
        if source.batch_size != t.batch_size:
            raise ValueError(f"data source batch size {source.batch_size} != train.batch_size {t.batch_size}")
        os.makedirs(self.workdir, exist_ok=True)
        with RunLock(self.workdir, enabled=self.is_main):
            return self._fit_locked(source, eval_source, desc, eval_fn)

    def _finite(self, state) -> bool:
        """Whether every float in params and optimizer state is finite: one reduction on device."""
        if getattr(self, "_finite_fn", None) is None:
            def all_finite(tree):
                leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                          if jnp.issubdtype(x.dtype, jnp.inexact)]
                return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
            self._finite_fn = jax.jit(lambda s: all_finite((s["params"], s["opt_state"])),
                                      out_shardings=replicated(self.mesh))
        with self.context():
            return bool(self._finite_fn(state))

    def _fit_locked(self, source, eval_source, desc, eval_fn):
        t = self.cfg.train
        ckpt_dir = os.path.join(self.workdir, "checkpoints")
        has_ckpt = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
        if self.is_main:
            check_config(self.workdir, self.cfg.to_dict(), t.on_config_change, has_ckpt)
        distributed_barrier("config-checked")
        ckpt = Checkpointer(ckpt_dir, keep=t.keep_checkpoints, every=t.checkpoint_every,
                            async_save=t.async_checkpoints)
        best = Checkpointer(os.path.join(self.workdir, "best"), keep=1, async_save=False) if t.best_metric else None
        best_value = None
        if best is not None and best.latest_step() is not None:
            best_value = best.read_meta()["value"]
        first = self.put_batch(source, 0)
        state = self.init_state(first)
        start, position = 0, 0
        log = print if self.is_main else (lambda *a, **k: None)
        restored = ckpt.restore_readable(abstract_like(state, self.state_shardings), log=log)
        if restored is not None:
            state, meta = restored
            start, position = int(meta["step"]), int(meta["data_position"])
            log(f"resumed from step {start} in {ckpt.directory}", flush=True)
        writer = MetricsWriter(os.path.join(self.workdir, "metrics.jsonl"), resume_step=start,
                               enabled=self.is_main)
        tokens = t.batch_size * getattr(self.task, "tokens_per_example", 1)
        bar = Progress(t.steps, start, tokens, desc, enabled=self.is_main and t.progress)
        pending = None  # metrics of the previous step, read one step late so the host never stalls the device
        logged = {"train": {}, "eval": {}}

        def last_good():
            ckpt.wait()  # a checkpoint counts once its save has completed (and it was verified finite)
            last = ckpt.latest_step()
            return f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None \
                else "no checkpoint was written yet"

        def verify(step):
            if not self._finite(state):
                raise NonFiniteLoss(f"parameters or optimizer state are non-finite after step {step} (the loss "
                                    f"was finite); training stopped and {last_good()}")

        def settle(item):
            step, metrics = item
            metrics = jax.device_get(metrics)
            loss = float(metrics["loss"])
            if not np.isfinite(loss) or not np.isfinite(float(metrics["grad_norm"])):
                raise NonFiniteLoss(f"non-finite loss ({loss}) or gradient norm at step {step}; "
                                    f"training stopped and {last_good()}")
            rate = bar.update(step, loss)
            if step % t.log_every == 0 or step == t.steps:
                logged["train"] = {k: float(v) for k, v in dict(metrics, tokens_per_s=rate).items() if np.ndim(v) == 0}
                writer.write(step, "train", logged["train"])

        started = time.perf_counter()
        try:
            for step in range(start + 1, t.steps + 1):
                batch = first if position == 0 else self.put_batch(source, position)
                state, metrics = self.train_step(state, batch)
                position += 1
                if pending is not None:
                    settle(pending)
                pending = (step, metrics)
                do_ckpt = ckpt.every and step % ckpt.every == 0 or step == t.steps
                do_eval = (eval_source is not None or eval_fn is not None) and t.eval_every and (
                    step % t.eval_every == 0 or step == t.steps)
                if do_ckpt or do_eval:
                    settle(pending)
                    pending = None
                if do_ckpt:
                    verify(step)
                    ckpt.save(step, state, {"step": step, "data_position": position}, force=True)
                if do_eval:
                    ev = self.evaluate(state["params"], eval_source, t.eval_batches) if eval_source else {}
                    if eval_fn is not None:
                        ev.update(eval_fn(state))
                    writer.write(step, "eval", ev)
                    logged["eval"] = {k: float(v) for k, v in ev.items() if np.ndim(v) == 0}
                    if best is not None:
                        if t.best_metric not in ev:
                            raise KeyError(f"train.best_metric={t.best_metric!r} is not among the eval metrics "
                                           f"{sorted(ev)}")
                        value = float(ev[t.best_metric])
                        if best_value is None or (value > best_value if t.best_mode == "max"
                                                  else value < best_value):
                            if not do_ckpt:
                                verify(step)
                            best_value = value
                            best.save(step, state, {"step": step, "value": value, "metric": t.best_metric},
                                      force=True)
            if pending is not None:
                settle(pending)
            seconds = time.perf_counter() - started
        except BaseException:
            bar.close()
            writer.close()
            for c in (ckpt, best):  # already failing: a save error too is printed, not raised over the first
                if c is not None:
                    try:
                        c.close()
                    except Exception as e:
                        print(f"error: {e}", file=sys.stderr)
            raise
        bar.close()
        writer.close()
        ckpt.close()  # raises CheckpointError if the last save failed
        if best is not None:
            best.close()
        return FitResult(state=state, steps=max(start, t.steps), train_seconds=seconds,
                         train_metrics=logged["train"], eval_metrics=logged["eval"])

    def restore_best(self, like_state):
        """(state, meta) of the best checkpoint (cfg.train.best_metric) in workdir/best."""
        best = Checkpointer(os.path.join(self.workdir, "best"), keep=1, async_save=False)
        try:
            return best.restore(abstract_like(like_state, self.state_shardings))
        finally:
            best.close()
