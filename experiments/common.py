"""Shared plumbing for study commands: CLI, run directories, atomic result files, machine description."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

from jaxemb.config import apply_overrides


def parse_study_args(description: str, get_config, default_workdir: str, argv=None):
    """--config NAME, --workdir DIR, --data PATH and trailing key=value overrides -> (args, cfg)."""
    p = argparse.ArgumentParser(description=description,
                                epilog="Overrides: any config key as key=value, e.g. train.steps=200 model.d_model=64")
    p.add_argument("--config", default="default", help="named config (default, tiny, paper)")
    p.add_argument("--workdir", default=None, help=f"run directory (default {default_workdir}/<config>)")
    p.add_argument("--data", default=None, help="text file, directory of text files, default, stdlib, pydoc "
                                                "or tfds:NAME (overrides data.source)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    cfg = get_config(args.config)
    apply_overrides(cfg, args.overrides)
    if args.data is not None:
        cfg.data.source = args.data
    args.workdir = args.workdir or os.path.join(default_workdir, args.config)
    os.makedirs(args.workdir, exist_ok=True)
    return args, cfg


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_figure(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def machine() -> dict:
    import jax
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def run_cli(main) -> None:
    """Runs a study's main(); bad input (ValueError, KeyError, FileNotFoundError) becomes one line on
    stderr and exit status 2, with no traceback. On CPU-only machines it first re-runs the command once with
    tcmalloc preloaded (jaxemb/runtime.py)."""
    import sys

    from jaxemb.runtime import use_tcmalloc
    use_tcmalloc()
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)
