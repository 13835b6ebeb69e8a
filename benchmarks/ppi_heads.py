"""PPI heads (HP, PAD; with and without ConvBERT) on frozen embeddings: jaxemb against ppiseq's layers in PyTorch.

    python -m benchmarks.ppi_heads                  # D 320 and 1280, batch 8 (2 at D 1280 with ConvBERT),
                                                    # sides 256-512 tokens; memory at L = 2000; ~8 min
    python -m benchmarks.ppi_heads --quick          # tiny shapes, about 2 minutes
    python -m benchmarks.ppi_heads --dims 320 --reps 3 --no-memory --note /tmp/ppi.md

One training step = forward, MSE loss, backward, global-norm clip 1.0 and AdamW (lr 5e-4, weight decay 0.01),
on fixed random per-residue embeddings (the frozen-PLM setting: the inputs are embeddings, only the head
trains). jaxemb: `make_head(HeadConfig(kind, convbert, implementation="xla"))`, the whole step under one
jax.jit; pooling through the XLA path, which is what implementation="auto" picks on CPU (the Pallas kernels
are TPU/GPU code; on CPU they only run in interpret mode, a correctness tool, so they are not timed here).
HP runs on chain rows (B, C, Lc, D) and on packed rows with segment ids (B, Lp, D); PAD on padded sides.

The PyTorch peer follows ppiseq (github.com/Proteinea/ppiseq): AttentionPooling1D (Linear(D, 1) without
bias, masked softmax), HF `ConvBertLayer` (8 heads, head_ratio 2, kernel 7, intermediate D/2),
`nn.MultiheadAttention(D, 8, bias=False, batch_first=True)` with key_padding_mask=mask.log(). Two forms:
"loop" runs each complex at batch one, as the reference trains (HP: each chain on its own, then each side's
chain vectors; no padding anywhere) and sums the loss over the batch before one backward; "batched" pads
every chain (HP) or side (PAD) into one tensor and masks. The batched HF ConvBERT reads pad positions in
its convolution branch (the reference avoids that with batch one), so with ConvBERT its outputs differ from
the other two at padded rows; it is timed as the speed a PyTorch user gets by batching naively.

Timing: the steps of one shape are timed in interleaved rounds (jax, torch, jax, ...; one untimed warm-up
each, JAX's compilation), medians reported; PyTorch with 2 intra-op threads. Peak memory: each jaxemb head
and layout in its own subprocess at L = 2000 (VmHWM; see esm2_speed.peak_rss for why not ru_maxrss).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys

import numpy as np

from benchmarks.common import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, WD, CLIP, CROSS_HEADS = 5e-4, 0.01, 1.0, 8
JAX_STEPS = ("hp_rows", "hp_packed", "pad")
TORCH_STEPS = ("hp_loop", "hp_batched", "pad_loop", "pad_batched")


# ---------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class Case:
    d: int
    batch: int
    side_min: int          # tokens per side (all its chains together), drawn in [side_min, side_max]
    side_max: int
    chains_min: int = 2    # chains per side, drawn in [chains_min, chains_max]
    chains_max: int = 4
    convbert: bool = False
    seed: int = 0


def complexes(case: Case) -> list:
    """Per complex (ligand chain lengths, receptor chain lengths): each side's length in [side_min, side_max]
    cut at random points into its chains (each at least 1 token)."""
    rng = np.random.default_rng(case.seed)
    out = []
    for _ in range(case.batch):
        sides = []
        for _ in range(2):
            n = int(rng.integers(case.chains_min, case.chains_max + 1))
            total = int(rng.integers(case.side_min, case.side_max + 1))
            if total < n:
                raise ValueError(f"a side of {total} tokens cannot hold {n} chains; raise side_min")
            cuts = np.sort(rng.choice(np.arange(1, total), size=n - 1, replace=False))
            sides.append(np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist())
        out.append(tuple(sides))
    return out


def layouts(case: Case, chain_lens: list | None = None) -> dict:
    """Random embeddings (N(0, 1), float32) laid out every way the heads take them, from one set of chains:
    'chains' (per complex, the list of (len, D) chain arrays, ligands first), 'n_lig', 'n_rec', 'hp_rows'
    (chains (B, C, Lc, D), chain_len (B, C)), 'hp_packed' (packed (B, Lp, D), packed_seg (B, Lp), 1.. per
    chain, 0 = padding), 'pad' (lig/rec (B, W, D) each side's chains joined, lig_len/rec_len), 'y' (B,)."""
    chain_lens = chain_lens or complexes(case)
    rng = np.random.default_rng(case.seed + 1)
    d, b = case.d, len(chain_lens)
    chains = [[rng.standard_normal((n, d), dtype=np.float32) for n in lig + rec] for lig, rec in chain_lens]
    n_lig = np.array([len(lig) for lig, _ in chain_lens], np.int32)
    n_rec = np.array([len(rec) for _, rec in chain_lens], np.int32)
    slots = int((n_lig + n_rec).max())
    lc = max(len(c) for cs in chains for c in cs)
    rows, rlen = np.zeros((b, slots, lc, d), np.float32), np.zeros((b, slots), np.int32)
    lp = max(sum(len(c) for c in cs) for cs in chains)
    packed, seg = np.zeros((b, lp, d), np.float32), np.zeros((b, lp), np.int32)
    sides = {"lig": [], "rec": []}
    for i, cs in enumerate(chains):
        pos = 0
        for j, c in enumerate(cs):
            rows[i, j, :len(c)], rlen[i, j] = c, len(c)
            packed[i, pos:pos + len(c)], seg[i, pos:pos + len(c)] = c, j + 1
            pos += len(c)
        sides["lig"].append(np.concatenate(cs[:n_lig[i]]))
        sides["rec"].append(np.concatenate(cs[n_lig[i]:]))
    pad = {}
    for name, xs in sides.items():
        w = max(len(x) for x in xs)
        pad[name] = np.stack([np.pad(x, ((0, w - len(x)), (0, 0))) for x in xs])
        pad[name + "_len"] = np.array([len(x) for x in xs], np.int32)
    return {"chains": chains, "n_lig": n_lig, "n_rec": n_rec, "slots": slots,
            "hp_rows": dict(chains=rows, chain_len=rlen, n_lig=n_lig, n_rec=n_rec),
            "hp_packed": dict(packed=packed, packed_seg=seg, n_lig=n_lig, n_rec=n_rec),
            "pad": pad, "y": rng.standard_normal(b).astype(np.float32)}


def tokens(data: dict) -> int:
    return int(data["pad"]["lig_len"].sum() + data["pad"]["rec_len"].sum())


# ---------------------------------------------------------------- the PyTorch peer (ppiseq's layers)

def torch_heads(d: int, convbert: bool, seed: int = 0):
    """{'hp': module, 'pad': module} built as ppiseq builds them (shared poolers / ConvBERT / attention)."""
    import torch
    from torch import nn
    from transformers.models import convbert as hf

    class Pool(nn.Module):  # ppiseq AttentionPooling1D (bias=False)
        def __init__(self):
            super().__init__()
            self.w_proj = nn.Linear(d, 1, bias=False)

        def forward(self, x, mask=None):
            s = self.w_proj(x).squeeze(-1)
            if mask is not None:
                s = s.masked_fill(~mask, -torch.inf)
            return (x * torch.softmax(s, -1).unsqueeze(-1)).sum(1)

    def conv_layer():
        cfg = hf.ConvBertConfig(hidden_size=d, num_hidden_layers=1, num_attention_heads=8, head_ratio=2,
                                intermediate_size=d // 2, conv_kernel_size=7, hidden_dropout_prob=0.2,
                                attention_probs_dropout_prob=0.1)
        return hf.ConvBertLayer(cfg)

    def conv(layer, x, mask=None):
        if layer is None:
            return x
        if mask is None:
            return layer(x)
        return layer(x, attention_mask=(1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min)

    class HP(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.chain_pool = Pool(), Pool()
            self.convbert = conv_layer() if convbert else None
            self.ffn = nn.Sequential(nn.Linear(2 * d, 2 * d, bias=False), nn.SiLU(),
                                     nn.Linear(2 * d, 2 * d, bias=False))
            self.output = nn.Linear(2 * d, 1)

        def tail(self, h):
            return self.output(self.ffn(h))[:, 0]

        def loop(self, chains, n_lig):
            """chains: per complex, its (1, len, D) chain tensors; batch one, as the reference."""
            out = []
            for cs, nl in zip(chains, n_lig):
                vecs = torch.cat([self.pool(conv(self.convbert, c)) for c in cs])
                sides = [self.chain_pool(vecs[None, :nl]), self.chain_pool(vecs[None, nl:])]
                out.append(self.tail(torch.cat(sides, -1)))
            return torch.cat(out)

        def batched(self, rows, chain_len, n_lig, n_rec):
            b, c, lc, _ = rows.shape
            flat, lens = rows.reshape(b * c, lc, d), chain_len.reshape(b * c)
            mask = torch.arange(lc)[None] < lens[:, None]
            # empty slots: pool one dummy position so softmax is finite; masked out at level 2
            mask = mask | (lens[:, None] == 0) & (torch.arange(lc)[None] == 0)
            vecs = self.pool(conv(self.convbert, flat, mask), mask).reshape(b, c, d)
            slot = torch.arange(c)[None]
            lig = slot < n_lig[:, None]
            rec = (slot >= n_lig[:, None]) & (slot < (n_lig + n_rec)[:, None])
            return self.tail(torch.cat([self.chain_pool(vecs, lig), self.chain_pool(vecs, rec)], -1))

    class PAD(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = Pool()
            self.convbert = conv_layer() if convbert else None
            self.attn = nn.MultiheadAttention(d, CROSS_HEADS, dropout=0.0, bias=False, batch_first=True)
            self.ffn = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
            self.output = nn.Linear(d, 1)

        def forward(self, lig, ml, rec, mr, conv_mask=True):
            """lig (B, Wl, D), ml (B, Wl) bool, likewise rec; ppiseq's AttnPoolAddConvBERTModel (which calls
            ConvBERT without a mask: conv_mask=False)."""
            lig = conv(self.convbert, lig, ml if conv_mask else None)
            rec = conv(self.convbert, rec, mr if conv_mask else None)
            o1 = self.attn(lig, rec, rec, key_padding_mask=mr.float().log(), need_weights=False)[0]
            o2 = self.attn(rec, lig, lig, key_padding_mask=ml.float().log(), need_weights=False)[0]
            h = self.pool(lig + o1, ml) + self.pool(rec + o2, mr)
            return self.output(self.ffn(h))[:, 0]

        def loop(self, sides):
            return torch.cat([self(l, torch.ones(l.shape[:2], dtype=torch.bool), r,
                                   torch.ones(r.shape[:2], dtype=torch.bool), False) for l, r in sides])

    torch.manual_seed(seed)
    heads = {"hp": HP(), "pad": PAD()}
    with torch.no_grad():
        for h in heads.values():  # the reference's output init
            h.output.weight.uniform_(-0.1, 0.1)
            h.output.bias.zero_()
    return heads


def torch_forwards(heads: dict, data: dict) -> dict:
    """{step name: () -> (B,) predictions} of the four PyTorch forms on `data` (tensors made once)."""
    import torch
    T = torch.from_numpy
    chains = [[T(c)[None] for c in cs] for cs in data["chains"]]
    n_lig = data["n_lig"].tolist()
    r = data["hp_rows"]
    rows = (T(r["chains"]), T(r["chain_len"]).long(), T(data["n_lig"]).long(), T(data["n_rec"]).long())
    p = data["pad"]
    masks = {s: torch.arange(p[s].shape[1])[None] < T(p[s + "_len"])[:, None] for s in ("lig", "rec")}
    sides = [(T(p["lig"][i:i + 1, :n]), T(p["rec"][i:i + 1, :m])) for i, (n, m) in
             enumerate(zip(p["lig_len"], p["rec_len"]))]
    pad_args = (T(p["lig"]), masks["lig"], T(p["rec"]), masks["rec"])
    return {"hp_loop": lambda: heads["hp"].loop(chains, n_lig), "hp_batched": lambda: heads["hp"].batched(*rows),
            "pad_loop": lambda: heads["pad"].loop(sides), "pad_batched": lambda: heads["pad"](*pad_args)}


def torch_steps(heads: dict, data: dict, threads: int = 2) -> dict:
    """{step name: () -> loss} one training step each (model in train mode: ConvBERT dropout on)."""
    import torch
    fwd = torch_forwards(heads, data)
    y = torch.from_numpy(data["y"])
    opts = {k: torch.optim.AdamW(h.parameters(), lr=LR, weight_decay=WD) for k, h in heads.items()}

    def step(name):
        head = heads[name.split("_")[0]]
        opt = opts[name.split("_")[0]]

        def run():
            torch.set_num_threads(threads)
            head.train()
            opt.zero_grad(set_to_none=True)
            loss = torch.mean((fwd[name]() - y) ** 2)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), CLIP)
            opt.step()
            return loss.detach()
        return run
    return {name: step(name) for name in TORCH_STEPS}


# ---------------------------------------------------------------- jaxemb

def jax_params(heads: dict, convbert: bool) -> dict:
    """The jaxemb params (Flax trees of numpy arrays) holding the PyTorch heads' weights."""
    from jaxemb.nn.convbert import params_from_hf
    sd = {k: {n: v.detach().numpy().copy() for n, v in h.state_dict().items()} for k, h in heads.items()}
    dense = lambda s, n, bias=True: dict(kernel=s[n + ".weight"].T, **({"bias": s[n + ".bias"]} if bias else {}))
    out = {}
    s = sd["hp"]
    out["hp"] = {"pool": {"weight": s["pool.w_proj.weight"]}, "chain_pool": {"weight": s["chain_pool.w_proj.weight"]},
                 "ffn_in": dense(s, "ffn.0", False), "ffn_out": dense(s, "ffn.2", False), "output": dense(s, "output")}
    s = sd["pad"]
    d = s["pool.w_proj.weight"].shape[1]
    h, hd = CROSS_HEADS, d // CROSS_HEADS
    wq, wk, wv = np.split(s["attn.in_proj_weight"], 3)
    cross = {n: {"kernel": w.T.reshape(d, h, hd)} for n, w in (("query", wq), ("key", wk), ("value", wv))}
    cross["out"] = {"kernel": s["attn.out_proj.weight"].T.reshape(h, hd, d)}
    out["pad"] = {"pool": {"weight": s["pool.w_proj.weight"]}, "cross": cross, "ffn_in": dense(s, "ffn.0"),
                  "ffn_out": dense(s, "ffn.2"), "output": dense(s, "output")}
    if convbert:
        for k in out:
            out[k]["convbert"] = params_from_hf(sd[k], prefix="convbert.")
    return out


def jax_head(kind: str, convbert: bool, slots: int):
    from jaxemb.models import ppi
    return ppi.make_head(ppi.HeadConfig(kind=kind, convbert=convbert, implementation="xla", max_chains=slots))


def jax_forwards(params: dict, data: dict, convbert: bool) -> dict:
    """{step name: () -> (B,) predictions} of the jaxemb heads (deterministic), jitted."""
    import jax
    out = {}
    for name in JAX_STEPS:
        kind = name.split("_")[0]
        head = jax_head(kind, convbert, data["slots"])
        fn = jax.jit(lambda p, a, head=head: head.apply({"params": p}, **a))
        out[name] = (lambda fn=fn, p=params[kind], a=data[name]: np.asarray(fn(p, a)))
    return out


def jax_step_fn(kind: str, convbert: bool, slots: int):
    """(params, opt_state, inputs, y, key) -> (params, opt_state, loss): one jitted AdamW step."""
    import jax
    import jax.numpy as jnp
    import optax
    head = jax_head(kind, convbert, slots)
    opt = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=WD))

    def loss_fn(p, inputs, y, key):
        z = head.apply({"params": p}, **inputs, deterministic=not convbert, rngs={"dropout": key})
        return jnp.mean((z - y) ** 2)

    @jax.jit
    def step(p, s, inputs, y, key):
        loss, g = jax.value_and_grad(loss_fn)(p, inputs, y, key)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss
    return step, opt


def jax_steps(params: dict, data: dict, convbert: bool, names=JAX_STEPS) -> dict:
    """{step name: () -> loss} one training step each, the state carried between calls."""
    import jax
    import jax.numpy as jnp
    out = {}
    for name in names:
        kind = name.split("_")[0]
        step, opt = jax_step_fn(kind, convbert, data["slots"])
        p = jax.tree.map(jnp.asarray, params[kind])
        state = {"p": p, "s": opt.init(p), "i": 0}
        inputs = jax.tree.map(jnp.asarray, data[name])
        y = jnp.asarray(data["y"])

        def run(step=step, state=state, inputs=inputs, y=y):
            state["i"] += 1
            state["p"], state["s"], loss = step(state["p"], state["s"], inputs, y, jax.random.key(state["i"]))
            return jax.block_until_ready(loss)
        out[name] = run
    return out


class Bench:
    """jaxemb and PyTorch heads on the same weights and inputs for one Case."""

    def __init__(self, case: Case, threads: int = 2):
        import torch
        torch.set_num_threads(threads)
        self.case, self.threads = case, threads
        self.data = layouts(case)
        self.torch = torch_heads(case.d, case.convbert, case.seed)
        self.params = jax_params(self.torch, case.convbert)

    def outputs(self) -> dict:
        """{step name: (B,) predictions} of every form, deterministic (dropout off)."""
        import torch
        for h in self.torch.values():
            h.eval()
        with torch.no_grad():
            out = {k: f().numpy() for k, f in torch_forwards(self.torch, self.data).items()}
        out.update({k: f() for k, f in jax_forwards(self.params, self.data, self.case.convbert).items()})
        return out


def measure(bench: Bench, reps: int) -> list:
    """One row per step form: median seconds per training step over `reps` interleaved rounds, after one
    warm-up each; plus the largest |prediction - torch loop's| (deterministic forward, same weights)."""
    from benchmarks.train_throughput import interleaved_times
    if reps < 1:
        raise ValueError(f"reps={reps}; expected at least 1")
    outs = bench.outputs()
    steps = dict(jax_steps(bench.params, bench.data, bench.case.convbert))
    steps.update(torch_steps(bench.torch, bench.data, bench.threads))
    for f in steps.values():
        f()  # warm-up (JAX: compilation)
    times = interleaved_times(steps, reps, reps)
    c, data = bench.case, bench.data
    common = dict(d=c.d, batch=c.batch, convbert=c.convbert, tokens=tokens(data), slots=data["slots"],
                  chain_width=data["hp_rows"]["chains"].shape[2], packed_width=data["hp_packed"]["packed"].shape[1],
                  side_width=max(data["pad"]["lig"].shape[1], data["pad"]["rec"].shape[1]), reps=reps)
    rows = []
    for name in steps:
        ref = outs["hp_loop" if name.startswith("hp") else "pad_loop"]
        rows.append(dict(common, step=name, head=name.split("_")[0],
                         framework="jax" if name in JAX_STEPS else "torch",
                         seconds=float(np.median(times[name])),
                         max_abs_diff=float(np.max(np.abs(outs[name] - ref)))))
    return rows


# ---------------------------------------------------------------- peak memory, one subprocess per run

def memory_lengths(chains: int, width: int, seed: int = 0) -> list:
    """One complex: `chains` chains (half ligand, half receptor), the first of each side `width` long, the
    others drawn in [width / 10, width]."""
    rng = np.random.default_rng(seed)
    half = chains // 2
    side = lambda: [width] + rng.integers(width // 10, width + 1, size=half - 1).tolist()
    return [(side(), side())]


def memory_child(step_name: str, d: int, batch: int, chains: int, width: int, convbert: bool) -> dict:
    """In this process: one jaxemb head step (warm-up, then a measured one) on `batch` copies of the
    memory_lengths complex; RSS loaded, process peak and step peak in bytes."""
    from benchmarks.esm2_speed import current_rss, peak_rss, step_peak
    lens = memory_lengths(chains, width) * batch
    case = Case(d=d, batch=batch, side_min=1, side_max=1, convbert=convbert)
    data = layouts(case, lens)
    import jax
    kind = step_name.split("_")[0]
    head = jax_head(kind, convbert, data["slots"])
    p = head.init(jax.random.key(0), **data[step_name])["params"]
    step = jax_steps({kind: p}, data, convbert, (step_name,))[step_name]
    loaded = current_rss()
    step()
    before = peak_rss()
    one = step_peak(step)
    return {"step": step_name, "d": d, "batch": batch, "chains": chains, "width": width, "convbert": convbert,
            "tokens": tokens(data), "input_bytes": int(sum(np.asarray(v).nbytes for v in data[step_name].values())),
            "loaded_bytes": loaded, "process_peak_bytes": max(before, one), "step_peak_bytes": one}


def measure_memory(cases: list, timeout: int = 600) -> list:
    """memory_child rows, each (step, d, batch, chains, width, convbert) in its own process; a run that
    fails (e.g. out of memory) gives a row with 'error'."""
    rows = []
    for step_name, d, batch, chains, width, convbert in cases:
        cmd = [sys.executable, "-m", "benchmarks.ppi_heads", "--memory-child", step_name, str(d), str(batch),
               str(chains), str(width), str(int(convbert))]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
            err = res.stderr.strip()[-500:] if res.returncode else None
        except subprocess.TimeoutExpired:
            res, err = None, f"timed out after {timeout} s"
        base = {"step": step_name, "d": d, "batch": batch, "chains": chains, "width": width, "convbert": convbert}
        rows.append(dict(base, error=err) if err else json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def default_memory_cases(width: int = 2000) -> list:
    hp = [(s, d, b, 8, width, cb) for d, b, cb in ((1280, 2, False), (320, 1, True)) for s in ("hp_rows", "hp_packed")]
    pad = [("pad", d, 2, 2, width, cb) for d, cb in ((1280, False), (320, True), (1280, True))]
    return hp + pad


# ---------------------------------------------------------------- report

def versions() -> dict:
    import jax
    import torch
    import transformers
    return {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def speed_table(rows: list) -> str:
    """One line per (D, ConvBERT, head): jaxemb and PyTorch ms per step and PyTorch time / jaxemb time."""
    by = {(r["d"], r["convbert"], r["step"]): r for r in rows}
    head = ["D", "ConvBERT", "head", "batch (tokens)", "jaxemb ms/step", "PyTorch loop (batch 1) ms",
            "PyTorch batched ms", "speed-up vs loop", "speed-up vs batched", "max abs diff vs loop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, cb in dict.fromkeys((r["d"], r["convbert"]) for r in rows):
        for kind, layouts_ in (("hp", ("hp_rows", "hp_packed")), ("pad", ("pad",))):
            loop, bat = by[(d, cb, kind + "_loop")], by[(d, cb, kind + "_batched")]
            for lay in layouts_:
                j = by[(d, cb, lay)]
                name = {"hp_rows": "HP, chain rows", "hp_packed": "HP, packed rows", "pad": "PAD"}[lay]
                cells = [str(d), "yes" if cb else "no", name, f"{j['batch']} ({j['tokens']})",
                         f"{1e3 * j['seconds']:.1f}", f"{1e3 * loop['seconds']:.1f}", f"{1e3 * bat['seconds']:.1f}",
                         f"{loop['seconds'] / j['seconds']:.2f}x", f"{bat['seconds'] / j['seconds']:.2f}x",
                         f"{j['max_abs_diff']:.1e} (batched {bat['max_abs_diff']:.1e})"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows: list) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f}"
    head = ["head, layout", "D", "ConvBERT", "batch x chains", "tokens", "input GiB", "step peak above loaded GiB",
            "step peak GiB", "process peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = {"hp_rows": "HP, chain rows", "hp_packed": "HP, packed rows", "pad": "PAD (2 sides)"}[r["step"]]
        cells = [name, str(r["d"]), "yes" if r["convbert"] else "no", f"{r['batch']} x {r['chains']}"]
        if r.get("error"):
            cells += ["-", "-", f"failed: {r['error'][-80:]}", "-", "-"]
        else:
            cells += [f"{r['tokens']:,}", gib(r["input_bytes"]), gib(r["step_peak_bytes"] - r["loaded_bytes"]),
                      gib(r["step_peak_bytes"]), gib(r["process_peak_bytes"])]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def report(rows: list, mem_rows: list, info: dict) -> str:
    h, v = info["host"], info["versions"]
    out = ["### PPI heads (HP, PAD): jaxemb vs ppiseq's layers in PyTorch, CPU",
           "",
           f"{v['date']}; {h['cpu_model']}, {h['cpu_count']} cores (shared); JAX {v['jax']} (XLA:CPU), torch "
           f"{v['torch']} (2 intra-op threads), transformers {v['transformers']}; fp32. Load average (1 min) at "
           f"start / end: {info['load'][0]:.1f} / {info['load'][1]:.1f}. Command: "
           f"`{' '.join(['python -m benchmarks.ppi_heads', *info['argv']])}`.",
           "",
           "One training step of the head on frozen per-residue embeddings (forward, MSE, backward, clip 1.0, "
           "AdamW; ConvBERT dropout on), same weights and inputs in both frameworks. Pooling: "
           "`implementation=\"xla\"`, which is what `\"auto\"` runs on CPU; the Pallas kernels run on CPU "
           "only in interpret mode (a correctness tool, not a speed path), so they are not timed. Each "
           "complex has 2-4 ligand and 2-4 receptor chains; each side has "
           f"{info['sides']} tokens; batch as in the table. PyTorch loop: each complex at batch one, as ppiseq "
           "trains (HP: each "
           "chain alone), one backward over the batch; PyTorch batched: chains (HP) or sides (PAD) padded "
           "into one tensor, masked (HF ConvBERT's convolution then reads pad positions, hence its diff). "
           "speed-up = PyTorch time / jaxemb time (> 1: jaxemb faster); medians of interleaved rounds after "
           "a warm-up. max abs diff: deterministic predictions against the PyTorch loop.",
           "", speed_table(rows)]
    if mem_rows:
        w = info["mem_width"]
        out += ["", "Peak resident memory of one jaxemb training step (each run in its own process; VmHWM, "
                    "reset via /proc/self/clear_refs before the measured step, after a warm-up step that "
                    f"compiles). HP: complexes of 8 chains (4 a side), the first chain of each side {w} "
                    f"tokens, the others drawn in [{w // 10}, {w}]; chain rows pad every chain to {w}, packed "
                    f"rows pad each complex to its total. PAD: sides of {w} tokens.",
                "", memory_table(mem_rows)]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="320,1280")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--side-min", type=int, default=256)
    p.add_argument("--side-max", type=int, default=512)
    p.add_argument("--reps", type=int, default=4, help="timed rounds per step (D <= 320 and no ConvBERT)")
    p.add_argument("--big-reps", type=int, default=2, help="timed rounds at D > 320 or with ConvBERT")
    p.add_argument("--big-convbert-batch", type=int, default=2,
                   help="batch at D > 320 with ConvBERT (the PyTorch loop takes ~6 s a complex there)")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--mem-width", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="D 32, batch 2, sides 16-32, 2 reps, memory at L = 200")
    p.add_argument("--workdir", default="runs/bench_ppi_heads")
    p.add_argument("--note", default="", help="also write the markdown section to this file")
    p.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        s, d, b, c, w, cb = args.memory_child
        print(json.dumps(memory_child(s, int(d), int(b), int(c), int(w), bool(int(cb)))), flush=True)
        return
    if args.quick:
        args.dims, args.batch, args.side_min, args.side_max, args.reps, args.big_reps = "32", 2, 16, 32, 2, 2
        args.mem_width = 200
    try:
        dims = [int(x) for x in args.dims.split(",")]
    except ValueError:
        raise ValueError(f"--dims={args.dims!r}; expected comma-separated widths") from None
    if any(d % 16 for d in dims):
        raise ValueError(f"--dims={args.dims!r}; each width must be a multiple of 16 (8 heads, ConvBERT halves)")
    if min(args.torch_threads, args.batch, args.big_convbert_batch) < 1 or not 4 <= args.side_min <= args.side_max:
        raise ValueError("--torch-threads, --batch and --big-convbert-batch must be >= 1, and "
                         "4 <= --side-min <= --side-max")
    load_start = os.getloadavg()[0]
    rows = []
    for d in dims:
        for cb in (False, True):
            batch = args.big_convbert_batch if (d > 320 and cb) else args.batch
            case = Case(d=d, batch=batch, side_min=args.side_min, side_max=args.side_max, convbert=cb)
            reps = args.big_reps if (d > 320 or cb) else args.reps
            print(f"D {d}, ConvBERT {cb}: {reps} reps", flush=True)
            new = measure(Bench(case, args.torch_threads), reps)
            for r in new:
                print(json.dumps(r), flush=True)
            rows += new
    mem_rows = [] if args.no_memory else measure_memory(
        default_memory_cases(args.mem_width) if not args.quick else
        [(s, 32, 1, 4, args.mem_width, cb) for s in JAX_STEPS for cb in (False, True)])
    info = {"host": host(), "versions": versions(), "load": (load_start, os.getloadavg()[0]),
            "sides": f"{args.side_min}-{args.side_max}", "mem_width": args.mem_width,
            "argv": list(sys.argv[1:] if argv is None else argv)}
    text = report(rows, mem_rows, info)
    print("\n" + text)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"rows": rows, "memory": mem_rows, **{k: v for k, v in info.items()}}, f, indent=1)
    if args.note:
        with open(args.note, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
