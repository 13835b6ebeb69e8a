"""Every study's numbers on its fixed seeds, for a before/after check of a refactor.

    python -m benchmarks.study_numbers --out before.json            # run on the old commit
    python -m benchmarks.study_numbers --out after.json --compare before.json

Runs the lexinvariant studies (position, tasks, semi, decipher, corpora), the glyph study and the KGE
study at their `tiny` configs in a temporary directory, keeps every number they return (timings, machine
and paths dropped) and, with --compare, lists each number that differs with its relative difference.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

SKIP = ("seconds", "machine", "tokens_per_s", "date", "workdir", "path", "time")
STUDIES = {
    "lexinvariant": ["all", "--config", "tiny", "train.progress=False"],
    "glyph": ["--config", "tiny", "train.progress=False"],
    "kge": ["--config", "tiny", "train.progress=False"],
}


def flatten(obj, prefix="", out=None) -> dict:
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(s in str(k).lower() for s in SKIP):
                flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}[{i}]", out)
    elif isinstance(obj, bool) or obj is None or isinstance(obj, str):
        pass
    elif isinstance(obj, (int, float)):
        out[prefix] = float(obj)
    elif hasattr(obj, "tolist"):
        flatten(obj.tolist(), prefix, out)
    return out


def _dejavu() -> str:
    """A fixed font for the glyph study (its default font depends on whether Unifont is installed)."""
    import matplotlib
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


def run(names) -> dict:
    import importlib
    STUDIES["glyph"] = STUDIES["glyph"] + [f"glyph.fonts={_dejavu()}"]
    numbers = {}
    for name in names:
        with tempfile.TemporaryDirectory() as wd:
            main = importlib.import_module(f"experiments.{name}").main
            res = main(STUDIES[name] + ["--workdir", os.path.join(wd, name)])
        numbers.update(flatten(res, name))
    return numbers


# keys that moved: values derived from data now sit beside the config as given (experiments/harness.py)
MOVED = {"glyph.config.model.vocab_size": "glyph.derived.vocab_size"}


def compare(new: dict, old: dict) -> list[str]:
    """Every number of `old` against `new` (under its MOVED key); numbers only in `new` are not differences."""
    lines = []
    for k in sorted(old):
        a, b = new.get(MOVED.get(k, k)), old[k]
        if a is None:
            lines.append(f"{k}: only in before")
        elif a != b and not (math.isnan(a) and math.isnan(b)):
            lines.append(f"{k}: {b!r} -> {a!r} (rel {abs(a - b) / max(abs(b), 1e-30):.2e})")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None)
    p.add_argument("--studies", default=",".join(STUDIES))
    a = p.parse_args(argv)
    numbers = run(a.studies.split(","))
    with open(a.out + ".tmp", "w") as f:
        json.dump(numbers, f, indent=1, sort_keys=True)
    os.replace(a.out + ".tmp", a.out)
    print(f"{len(numbers)} numbers -> {a.out}")
    if a.compare:
        before = json.load(open(a.compare))
        diff = compare(numbers, before)
        added = set(numbers) - set(before) - {MOVED.get(k, k) for k in before}
        print(f"{len(added)} numbers only in after (new keys, not compared)")
        print("\n".join(diff) if diff else "all numbers identical")
        sys.exit(1 if diff else 0)


if __name__ == "__main__":
    main()
