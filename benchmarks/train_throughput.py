"""Training throughput of jaxemb's LM against the same model written plainly in PyTorch.

    python -m benchmarks.train_throughput                 # default + 150M configs, jaxemb and PyTorch
    python -m benchmarks.train_throughput --sizes default --steps 20 --no-torch
    python -m benchmarks.train_throughput --append        # also append the table to BENCHMARKS.md
    python -m benchmarks.train_throughput --onednn both   # XLA:CPU with oneDNN off and on, one process each

Reports train tokens/s, model FLOPs utilisation (MFU) against the measured fp32 (or bf16) matmul peak of
the same backend, peak memory, and the tokens/s ratio jaxemb / PyTorch. On CPU the 150M config runs with a
small batch (--big-batch) so that a step takes seconds, not minutes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import ONEDNN_MODES, machine, machine_line, rerun_each_onednn, set_onednn, strip_option
from experiments.harness import run_cli, write_json
from experiments.configs.lexinvariant import get_config
from jaxemb.models.lexinvariant import LanguageModelTask, parameter_count
from jaxemb.train import Trainer


def matmul_peak(dtype=jnp.float32, n=2048, reps=10) -> float:
    """FLOP/s of a large square matmul on the default backend: the best of `reps` timed calls (on a shared
    or throttled machine the mean of a burst reads low, and MFU over it then reads high)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def flops_per_token(m, seq_len: int, params: int) -> float:
    """6N for the matmuls of forward+backward plus attention scores/values (PaLM's estimate)."""
    return 6 * params + 12 * m.num_layers * m.num_heads * m.head_dim * seq_len


def peak_memory_bytes() -> int:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (CPU)


class RandomTokens:
    def __init__(self, batch_size, seq_len, vocab, seed=0):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, vocab, size=(4, batch_size, seq_len + 1)).astype(np.int32)
        self.batch_size = batch_size

    def get(self, index, rows=slice(None)):
        t = self.tokens[index % 4][rows]
        return {"inputs": t[:, :-1], "targets": t[:, 1:], "segment_ids": np.ones_like(t[:, :-1]),
                "weights": np.ones(t[:, :-1].shape, np.float32)}


def jax_runner(cfg, warmup: int = 2):
    """(step, info): step() runs one jaxemb train step to completion; info() gives params, loss, memory."""
    cfg = copy.deepcopy(cfg)
    cfg.train.update(steps=10 ** 9, checkpoint_every=0, eval_every=0, progress=False)
    task = LanguageModelTask(cfg.model, cfg.data.seq_len)
    trainer = Trainer(task, cfg, "/tmp/jaxemb_bench_unused")
    src = RandomTokens(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    batches = [trainer.put_batch(src, i) for i in range(4)]
    box = {"state": trainer.init_state(batches[0]), "i": 0, "m": None}

    def step():
        box["state"], box["m"] = trainer.train_step(box["state"], batches[box["i"] % 4])
        box["i"] += 1
        jax.block_until_ready(box["m"])

    for _ in range(warmup):
        step()
    memory = peak_memory_bytes()  # now, before the PyTorch peer allocates in this process
    return step, lambda: {"params": parameter_count(box["state"]["params"]), "loss": float(box["m"]["loss"]),
                          "peak_memory_bytes": memory}


def torch_runner(cfg, warmup: int = 2):
    """(step, info) for the same model, optimizer and shapes written plainly in PyTorch (CPU)."""
    import torch
    from benchmarks import torch_peer
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    model, opt = torch_peer.make(cfg.model, cfg.optim)
    src = RandomTokens(cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    data = [(torch.from_numpy(src.tokens[i][:, :-1]).long(), torch.from_numpy(src.tokens[i][:, 1:]).long())
            for i in range(4)]
    box = {"i": 0, "loss": None}

    def step():
        box["loss"] = torch_peer.train_step(model, opt, *data[box["i"] % 4], cfg.optim.clip_norm).item()
        box["i"] += 1

    for _ in range(warmup):
        step()
    return step, lambda: {"params": sum(p.numel() for p in model.parameters()), "loss": box["loss"]}


def interleaved_times(steps: dict, total: int, rounds: int) -> dict:
    """Seconds per step of each runner, one value per round, timed in alternating rounds (A, B, A, B, ...)
    so that the drift of a shared or throttled machine falls on all of them alike."""
    per_round = max(1, total // rounds)
    times = {name: [] for name in steps}
    for _ in range(max(1, min(rounds, total))):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(per_round):
                step()
            times[name].append((time.perf_counter() - t) / per_round)
    return times


def interleaved_step_times(steps: dict, total: int, rounds: int) -> dict:
    """Median seconds per step of each runner over the rounds of interleaved_times."""
    return {name: float(np.median(v)) for name, v in interleaved_times(steps, total, rounds).items()}


def configs(names, big_batch: int):
    out = {}
    for name in names:
        if name in ("default", "tiny"):
            c = get_config(name)
            c.model.kind = "standard"
        elif name == "150M":
            c = get_config("paper")
            c.model.update(kind="standard", remat=False)
            c.mesh.shape = dict(data=-1, fsdp=1, tensor=1)
            if jax.default_backend() == "cpu":
                c.train.update(batch_size=big_batch, compute_dtype="float32")
        else:
            raise ValueError(f"unknown size {name!r}; expected default, 150M or tiny")
        out[name] = c
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="default,150M")
    p.add_argument("--steps", type=int, default=48, help="timed steps per framework, default config")
    p.add_argument("--big-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12,
                   help="the timed steps alternate between frameworks in this many rounds (median reported)")
    p.add_argument("--big-batch", type=int, default=4, help="150M batch size on CPU")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--workdir", default="runs/bench_train")
    p.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    p.add_argument("--onednn", choices=ONEDNN_MODES, default="default",
                   help="XLA:CPU oneDNN switch (--xla_cpu_use_onednn); 'both' runs off and on, one process each")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.onednn == "both":
        import sys
        argv = list(sys.argv[1:] if argv is None else argv)
        rest = strip_option(strip_option(argv, "--onednn"), "--workdir")
        rerun_each_onednn("benchmarks.train_throughput", rest, "--workdir", args.workdir)
        return
    set_onednn(args.onednn)
    cfgs = configs(args.sizes.split(","), args.big_batch)
    bf16 = any(c.train.compute_dtype == "bfloat16" for c in cfgs.values())
    peak = matmul_peak(jnp.bfloat16 if bf16 else jnp.float32)
    rows = []
    for name, cfg in cfgs.items():
        steps = args.steps if name == "default" else args.big_steps
        tokens = cfg.train.batch_size * cfg.data.seq_len
        runners = {"jax": jax_runner(cfg)}
        if not args.no_torch and jax.default_backend() == "cpu":
            runners["torch"] = torch_runner(cfg)
        step_s = interleaved_step_times({k: r[0] for k, r in runners.items()}, steps, args.rounds)
        j = runners["jax"][1]()
        row = {"config": name, "params": j["params"], "batch": cfg.train.batch_size, "seq": cfg.data.seq_len,
               "dtype": cfg.train.compute_dtype, "jax_tok_s": tokens / step_s["jax"],
               "mfu": flops_per_token(cfg.model, cfg.data.seq_len, j["params"]) * tokens / step_s["jax"] / peak,
               "peak_mem_gb": j["peak_memory_bytes"] / 2 ** 30}
        if "torch" in step_s:
            row["torch_tok_s"] = tokens / step_s["torch"]
            row["ratio"] = row["jax_tok_s"] / row["torch_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    m = machine()
    header = "| config | params | batch x seq | dtype | jaxemb tok/s | MFU | peak mem GiB | PyTorch tok/s | jaxemb/PyTorch |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']}x{r['seq']} | {r['dtype']} | "
                     f"{r['jax_tok_s']:,.0f} | {r['mfu']:.1%} | {r['peak_mem_gb']:.2f} | "
                     f"{r.get('torch_tok_s', float('nan')):,.0f} | {r.get('ratio', float('nan')):.2f}x |")
    table = "\n".join(lines)
    print(f"\nmatmul peak ({'bf16' if bf16 else 'fp32'}): {peak / 1e9:.1f} GFLOP/s; {machine_line(m)}; "
          f"XLA:CPU oneDNN {args.onednn}\n")
    print(table)
    write_json(os.path.join(args.workdir, "results.json"), {"rows": rows, "peak_flops": peak, "machine": m,
                                                             "onednn": args.onednn})
    if args.append:
        with open("BENCHMARKS.md", "a") as f:
            f.write(f"\n### Training throughput, {machine_line(m)}, XLA:CPU oneDNN {args.onednn}\n"
                    f"matmul peak {peak / 1e9:.1f} GFLOP/s\n\n{table}\n")


if __name__ == "__main__":
    run_cli(main)  # tcmalloc re-run and one-line errors, as the experiments
