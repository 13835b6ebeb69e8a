"""The one study harness: command line, named variants trained through the core, results, tables, plots.

A study's main(argv) calls `parse` (--config NAME, --workdir DIR, --data ... and key=value overrides in any
order), trains each named variant with `train_variant` (resumable in WORKDIR/<variant>), and writes its
results with `write_results` (atomic JSON with the config as given, the values derived from data and the
machine), `print_table` and `plot`. `run_cli(main)` turns bad input into one line and an exit status.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import errno
import json
import os
import platform
import sys
import tempfile
from typing import Any

import numpy as np

from jaxemb.config import apply_overrides

# -- command line --------------------------------------------------------------------------------------------


def parse(argv, description: str, get_config, default_workdir, *, data: bool = True, options: dict = None,
          commands: tuple = ()):
    """(args, cfg) from argv: --config, --workdir, --data (with data=True), each of `options`
    ({"--flag": (config key or None, help)}: a key takes the value as that config setting, None passes it to
    get_config as a keyword), at most one of `commands` and key=value overrides, mixed in any order.
    args has config, workdir (created), overrides, command and one attribute per option."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                epilog="Overrides: any config key as key=value, e.g. train.steps=200")
    p.add_argument("--config", default="default", help="named config (see experiments/configs)")
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<study>/<config>)")
    if data:
        p.add_argument("--data", default=None, help="data source (overrides data.source)")
    options = options or {}
    for flag, (_, help_text) in options.items():
        p.add_argument(flag, default=None, help=help_text)
    args, rest = p.parse_known_args(argv)
    args.overrides, args.command = [], None
    for item in rest:
        if item.startswith("-"):
            p.error(f"unrecognized option {item!r}")
        elif item in commands and args.command is None:
            args.command = item
        elif "=" in item:
            args.overrides.append(item)
        else:
            known = f"one of {', '.join(commands)} or " if commands else ""
            p.error(f"{item!r}: expected {known}a key=value config override")
    dest = lambda flag: flag.lstrip("-").replace("-", "_")
    cfg = get_config(args.config, **{dest(f): getattr(args, dest(f)) for f, (key, _) in options.items()
                                     if key is None})
    apply_overrides(cfg, args.overrides)
    for flag, (key, _) in options.items():
        if key is not None and getattr(args, dest(flag)) is not None:
            section, leaf = key.rsplit(".", 1)
            cfg[section][leaf] = getattr(args, dest(flag))
    if data and args.data is not None:
        cfg.data.source = args.data
    base = default_workdir(args) if callable(default_workdir) else default_workdir
    args.workdir = ensure_dir(args.workdir or os.path.join(base, args.config))
    return args, cfg


def ensure_dir(path: str) -> str:
    """Creates `path` if needed and checks that it is a writable directory; OSError (naming the path) if not."""
    if os.path.islink(path) and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"{os.strerror(errno.ENOENT)} (a symbolic link to "
                                              f"{os.readlink(path)!r})", path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    os.close(fd)
    os.remove(probe)
    return path


_RUN_OS_ERRORS = (errno.ENOSPC, errno.EIO, errno.EDQUOT)  # the machine failed, not the input


def run_cli(main) -> None:
    """Runs a study's main(). Bad input (ValueError, KeyError, an OSError such as a missing file or a
    workdir that cannot be written) becomes one line on stderr and exit status 2; a run that fails (a
    non-finite loss, a full disk) one line and status 1; no traceback. On CPU-only machines it first re-runs
    the command once with tcmalloc preloaded (jaxemb/runtime.py)."""
    from jaxemb.runtime import use_tcmalloc
    use_tcmalloc()
    from jaxemb.train import NonFiniteLoss
    try:
        main()
    except OSError as e:
        print(f"error: {os_message(e)}", file=sys.stderr)
        sys.exit(1 if e.errno in _RUN_OS_ERRORS else 2)
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def os_message(e: OSError) -> str:
    """The operating system's message and the path(s): 'Permission denied: /x', never a bare errno."""
    if e.strerror is None:
        return str(e.args[0]) if e.args else type(e).__name__
    paths = [repr(os.fsdecode(f)) for f in (e.filename, e.filename2) if f is not None]
    return f"{e.strerror}: {' -> '.join(paths)}" if paths else e.strerror


# -- variants ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """A trained variant: its task, trainer (for map_batches on its mesh) and the core's FitResult."""
    name: str
    task: Any
    trainer: Any
    result: Any

    @property
    def params(self):
        return self.result.state["params"]


def with_settings(cfg, **settings):
    """A copy of cfg with dotted settings, e.g. with_settings(cfg, **{"model.vocab_size": 256})."""
    c = copy.deepcopy(cfg)
    for key, value in settings.items():
        section, leaf = key.rsplit(".", 1)
        with c[section].ignore_type():
            c[section][leaf] = value
    return c


def train_variant(name: str, task, cfg, workdir: str, train, valid=None, eval_fn=None, desc: str = None) -> Variant:
    """Trains (or resumes, or only restores when finished) `task` in workdir/name through the core.
    eval_fn(trainer, state) -> dict is logged with the core's eval metrics every train.eval_every steps."""
    from jaxemb.train import Trainer
    trainer = Trainer(task, cfg, ensure_dir(os.path.join(workdir, name)))
    fn = (lambda state: eval_fn(trainer, state)) if eval_fn is not None else None
    return Variant(name, task, trainer, trainer.fit(train, valid, desc=desc or name, eval_fn=fn))


def evaluate(variant: Variant, source) -> dict:
    """The core's exact eval metrics of the variant over every batch of `source` (padding weighs 0)."""
    return variant.trainer.evaluate(variant.params, source, source.num_batches)


def map_rows(variant: Variant, fn, source, params=None) -> np.ndarray:
    """fn(params, batch, rng) over every batch of an evaluation source, concatenated and cut to its real
    rows (the padding of the last batch dropped), in row order (a source that visits the rows in another
    order, e.g. jaxemb.data.sources.BucketSource, says which with `row_order`)."""
    return batch_rows(variant.trainer, fn, variant.params if params is None else params, source)


def batch_rows(trainer, fn, params, source) -> np.ndarray:
    """map_rows with a trainer (e.g. inside an eval_fn)."""
    out = np.concatenate(trainer.map_batches(fn, params, source, source.num_batches))[:source.num_rows]
    if hasattr(source, "row_order"):
        ordered = np.empty_like(out)
        ordered[source.row_order(0)] = out
        out = ordered
    return out


# -- results -------------------------------------------------------------------------------------------------


def machine() -> dict:
    import jax
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_results(workdir: str, name: str, results: dict, cfg=None, derived: dict = None) -> dict:
    """results + the config as given + the values derived from data + the machine, written atomically to
    workdir/name; returns that dict."""
    out = dict(results)
    if cfg is not None:
        out["config"] = cfg.to_dict()
    if derived is not None:
        out["derived"] = derived
    out["machine"] = machine()
    write_json(os.path.join(workdir, name), out)
    return out


def print_table(rows: list, title: str = "", width: int = 12, fmt: str = ".3f", formats: dict = None) -> None:
    """Rows of dicts as right-aligned columns; floats as `fmt` (or formats[column]), ints with commas."""
    formats = formats or {}
    keys = list(rows[0])

    def cell(k, v):
        spec = formats.get(k, fmt if isinstance(v, float) else "," if isinstance(v, int) else "")
        return f"{format(v, spec) if v is not None else '-':>{width}}"

    if title:
        print(f"\n{title}")
    print("  ".join(f"{k:>{width}}" for k in keys))
    for row in rows:
        print("  ".join(cell(k, row[k]) for k in keys))


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average with edge padding (window <= 1: unchanged)."""
    if window <= 1:
        return x
    pad = window // 2
    return np.convolve(np.pad(x, pad, mode="edge"), np.ones(window) / window, mode="valid")[:len(x)]


def plot(path: str, panels: list, figsize=(7, 4.2)) -> None:
    """Writes a PNG atomically. Each panel: dict(lines=[dict(x, y, label, **matplotlib style)],
    bars=[dict(x, height, width, label)], xlabel, ylabel, title, yscale, ylim, xticks=(x, labels),
    legend_size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel.get("lines", []):
            ax.plot(line.pop("x"), line.pop("y"), **line)
        for bar in panel.get("bars", []):
            ax.bar(bar.pop("x"), bar.pop("height"), **bar)
        ax.set(xlabel=panel.get("xlabel", ""), ylabel=panel.get("ylabel", ""), title=panel.get("title", ""))
        if "yscale" in panel:
            ax.set_yscale(panel["yscale"])
        if "ylim" in panel:
            ax.set_ylim(*panel["ylim"])
        if "xticks" in panel:
            ax.set_xticks(panel["xticks"][0], panel["xticks"][1], rotation=15)
        ax.grid(alpha=0.3)
        if panel.get("lines") and any("label" in x for x in panel["lines"]) or panel.get("bars"):
            ax.legend(fontsize=panel.get("legend_size"))
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path: str) -> None:
    """Saves a matplotlib figure atomically (for plots that `plot` does not cover)."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
