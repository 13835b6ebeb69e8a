"""Training throughput of NFE-1 (1-vs-all) on the training core against the reference computation in PyTorch.

    python -m benchmarks.kge_throughput                          # WN18RR, dimension 256, batch 128, + PyTorch
    python -m benchmarks.kge_throughput --dim 64 --steps 8 --rounds 4      # a short run
    python -m benchmarks.kge_throughput --model nfe3 --dim 64 --dataset umls --no-torch
    python -m benchmarks.kge_throughput --onednn both             # XLA:CPU with oneDNN off and on
    python -m benchmarks.kge_throughput --epoch                   # also time one full epoch through fit()
    python -m benchmarks.kge_throughput --append                  # append the table to BENCHMARKS.md

Times the core's compiled train step and, in the same run, the reference code's NFE-1 computation written
plainly in PyTorch (benchmarks/torch_peer_nfe.py) on the same batches, in alternating rounds so the drift of
a shared machine falls on both alike; reports median step times, triples/s, the epoch time they imply (an
epoch = ceil(2 x train triples / batch) steps over reciprocal triples), the speed-up over PyTorch, and the
time to rank all validation queries (filtered, both directions).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax

from benchmarks.common import ONEDNN_MODES, machine, machine_line, rerun_each_onednn, set_onednn, strip_option
from experiments import kge
from experiments.harness import run_cli, write_json
from experiments.configs.kge import get_config
from jaxemb.data import kg


def bench_config(dataset: str, model: str, dim: int, batch: int):
    """The reference code's WN18RR NFE-1 settings (gamma 1, lr 0.005, decay 0.9) with dataset, model, dim and
    batch replaced; one epoch, no checkpoints."""
    cfg = get_config("paper", "WN18RR", "nfe1")
    cfg.data.source = dataset
    cfg.model.update(name=model, dim=dim)
    cfg.train.update(batch_size=batch, progress=False, checkpoint_every=0)
    cfg.study.epochs = 1
    return kge.model_config(cfg, model, [])


def jax_runner(cfg, graph, workdir: str, pool: int = 16, warmup: int = 2):
    """(step, info): step() runs one jaxemb train step to completion, cycling over `pool` placed batches."""
    task, trainer, train = kge.setup(cfg, graph, workdir)
    batches = [trainer.put_batch(train, i) for i in range(pool)]
    box = {"state": trainer.init_state(batches[0]), "i": 0, "m": None}

    def step():
        box["state"], box["m"] = trainer.train_step(box["state"], batches[box["i"] % pool])
        box["i"] += 1
        jax.block_until_ready(box["m"])

    for _ in range(warmup):
        step()
    return step, {"task": task, "trainer": trainer, "train": train, "state": lambda: box["state"],
                  "loss": lambda: float(box["m"]["loss"])}


def torch_runner(cfg, graph, train, pool: int = 16, warmup: int = 2):
    """(step, info) for the reference's NFE-1 computation in PyTorch on the same batches (nfe1 only)."""
    import torch
    from benchmarks import torch_peer_nfe
    if cfg.model.name != "nfe1":
        raise ValueError(f"the PyTorch peer is NFE-1 only; got --model {cfg.model.name} (use --no-torch)")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count())
    model, opt = torch_peer_nfe.make(graph.num_entities, graph.num_relations, cfg.model.dim, cfg.model.gamma,
                                     cfg.optim.lr)
    data = []
    for i in range(pool):
        b = train.get(i)
        keep = b["weights"] > 0  # the reference's last batch is short, not padded
        data.append(tuple(torch.from_numpy(b[k][keep]).long() for k in ("head", "rel", "tail")))
    box = {"i": 0, "loss": None}

    def step():
        box["loss"] = torch_peer_nfe.train_step(model, opt, *data[box["i"] % pool])
        box["i"] += 1

    for _ in range(warmup):
        step()
    return step, {"loss": lambda: box["loss"], "threads": torch.get_num_threads(), "torch": torch.__version__}


def measure(cfg, graph, steps: int, rounds: int, with_torch: bool, rank: bool = True, workdir: str | None = None):
    """One row: median step times of jaxemb (and PyTorch, interleaved), implied epoch times, ranking time."""
    from benchmarks.train_throughput import interleaved_step_times
    workdir = workdir or tempfile.mkdtemp(prefix="kge_bench_")
    j_step, j = jax_runner(cfg, graph, workdir)
    runners = {"jax": j_step}
    t_info = None
    if with_torch:
        runners["torch"], t_info = torch_runner(cfg, graph, j["train"])
    step_s = interleaved_step_times(runners, steps, rounds)
    spe = j["train"].num_batches
    row = {"dataset": graph.name, "model": cfg.model.name, "dim": cfg.model.dim, "batch": cfg.train.batch_size,
           "entities": graph.num_entities, "steps_per_epoch": spe, "timed_steps": steps, "rounds": rounds,
           "step_ms": 1e3 * step_s["jax"], "steps_per_s": 1 / step_s["jax"],
           "triples_per_s": cfg.train.batch_size / step_s["jax"], "epoch_s": step_s["jax"] * spe,
           "loss": j["loss"]()}
    if t_info is not None:
        row.update(torch_step_ms=1e3 * step_s["torch"], torch_epoch_s=step_s["torch"] * spe,
                   speedup=step_s["torch"] / step_s["jax"], torch_loss=t_info["loss"](),
                   torch_threads=t_info["threads"], torch=t_info["torch"])
    if rank:
        valid = kg.QuerySource(kg.reciprocal(graph.valid, graph.num_relations), kg.Filter(graph), 256)
        params = j["state"]()["params"]
        kge.rank_queries(j["trainer"], j["task"], params, valid)  # compile
        t = time.perf_counter()
        kge.rank_queries(j["trainer"], j["task"], params, valid)
        row.update(valid_rank_s=time.perf_counter() - t, valid_queries=len(valid.queries))
    return row


def run(args) -> dict:
    set_onednn(args.onednn)
    cfg = bench_config(args.dataset, args.model, args.dim, args.batch)
    graph = kg.load(cfg.data.source, cfg.data.root)
    workdir = tempfile.mkdtemp(prefix="kge_bench_")
    with_torch = not args.no_torch and jax.default_backend() == "cpu"
    row = measure(cfg, graph, args.steps, args.rounds, with_torch, workdir=workdir)
    row.update(onednn=args.onednn, machine=machine())
    if args.epoch:
        task, trainer, train = kge.setup(cfg, graph, os.path.join(workdir, "epoch"))
        row["fit_epoch_s"] = trainer.fit(train, desc="epoch").train_seconds
    return row


def table(rows: list) -> str:
    nan = float("nan")
    m = rows[0]["machine"]
    if len({r["onednn"] for r in rows}) > 1:  # the flag differs by row: the column names it
        m = dict(m, xla_flags="")
    lines = [f"KGE throughput ({machine_line(m)})", "",
             "| dataset | model | dim | batch | XLA:CPU oneDNN | jaxemb step ms | PyTorch step ms | speed-up "
             "| triples/s | epoch s (from steps) | PyTorch epoch s | epoch s (fit) | rank valid s |",
             "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['dim']} | {r['batch']} | {r['onednn']} | {r['step_ms']:.1f} "
            f"| {r.get('torch_step_ms', nan):.1f} | {r.get('speedup', nan):.2f}x | {r['triples_per_s']:,.0f} "
            f"| {r['epoch_s']:.0f} | {r.get('torch_epoch_s', nan):.0f} | {r.get('fit_epoch_s', nan):.0f} "
            f"| {r.get('valid_rank_s', nan):.1f} ({r.get('valid_queries', 0)} queries) |")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="WN18RR")
    p.add_argument("--model", default="nfe1")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per framework (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=6, help="the timed steps alternate between frameworks in "
                                                         "this many rounds (median reported)")
    p.add_argument("--no-torch", action="store_true", help="time jaxemb only")
    p.add_argument("--onednn", choices=ONEDNN_MODES, default="default",
                   help="XLA:CPU oneDNN switch (--xla_cpu_use_onednn); 'both' runs off and on, one process each")
    p.add_argument("--epoch", action="store_true", help="also time one full epoch through Trainer.fit")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--out", default="runs/bench_kge/results.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if args.onednn == "both":
        import json
        rest = strip_option(strip_option([a for a in argv if a != "--append"], "--onednn"), "--out")
        paths = rerun_each_onednn("benchmarks.kge_throughput", rest, "--out", args.out)
        rows = []
        for path in paths.values():
            with open(path) as f:
                rows += json.load(f)["rows"]
    else:
        rows = [run(args)]
    text = table(rows)
    print(text)
    write_json(args.out, {"rows": rows})
    if args.append:
        with open("BENCHMARKS.md", "a") as f:
            f.write("\n" + text + "\n")
    return {"rows": rows}


if __name__ == "__main__":
    run_cli(main)  # tcmalloc re-run and one-line errors, as the experiments
