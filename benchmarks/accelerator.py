"""One prepared accelerator check: `python -m benchmarks.accelerator --out DIR [--preset gpu|cpu-smoke]`.

Runs five stages, each in its own process with its own time limit, so that a failure or a hung compile in one
loses nothing of the others, and writes DIR/results.json and DIR/results.md (updated after every stage):

  kernels   attention-pool kernels, in four steps: compile the bench presets plus two head tiles (H 20 / D 600)
            and D 1280 fp32; correctness of forward, dx and dq against the fp32 XLA reference (lengths 0/1/odd/L,
            packed segments with empty ones, split-L at B 1 / L 64k, two head tiles with short segments,
            NaN-filled padding; dx padding must be exactly 0); bandwidth at full and half lengths against XLA
            and the HBM peak; the block rows x warps x stages sweep
  bench     the jaxemb.kernels.bench timing table (GB/s, % of HBM peak, speed-up over XLA, fwd and fwd+bwd)
  lm        the 150M LM (paper shapes) in bf16: tokens/s and MFU against a bf16 matmul peak measured here
  nfe       NFE-1 at the paper config on WN18RR (d 1024): steps/s and projected epoch time
  fidelity  standard vs lexinvariant LM (~25M parameters) trained for the time left on the embedded corpus:
            perplexity by context position, the table the main study prints

The total --budget-s (default 480 s: the whole command stays under 9 minutes on one H100/H200) is shared out
stage by stage by weight over the time still left, so a stage that finishes early leaves its time to the
next; fidelity runs last and trains for what remains. `--preset cpu-smoke` runs the same stages at tiny
sizes on CPU (kernels in interpret mode) in about two minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback

from benchmarks.common import host

ORDER = ("kernels", "bench", "lm", "nfe", "fidelity")
WEIGHTS = {"kernels": 0.30, "bench": 0.12, "lm": 0.18, "nfe": 0.08, "fidelity": 0.32}
DEFAULT_BUDGET = {"gpu": 480.0, "cpu-smoke": 300.0}  # cpu-smoke: a cap for a loaded machine
FAULT_ENV = "JAXEMB_ACCELERATOR_FAULT"  # tests only: "stage:raise" or "stage:hang", comma-separated
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_plain)
    os.replace(tmp, path)


def _plain(v):
    """numpy scalars and arrays -> python (json default hook)."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def share(budget_left: float, remaining: list) -> float:
    """Seconds for remaining[0]: its weight's part of the time left, over the stages still to run."""
    return max(0.0, budget_left) * WEIGHTS[remaining[0]] / sum(WEIGHTS[s] for s in remaining)


def grace(seconds: float) -> float:
    """Time past its share before a stage's process is killed (it aims to stop at its share)."""
    return 5.0 + 0.1 * seconds


# -- child: one stage --------------------------------------------------------------------------------------

def run_stage(name: str, preset: str, out_dir: str, seconds: float, kg_root: str = "") -> None:
    """Runs stage `name` in this process; writes out_dir/stages/NAME.json as it goes. Never raises."""
    started = time.time()
    path = os.path.join(out_dir, "stages", f"{name}.json")
    record = {"stage": name, "status": "running", "budget_s": seconds, "result": {}}

    def flush():
        record["seconds"] = time.time() - started
        write_json(path, record)

    flush()
    try:
        fault = dict(f.split(":") for f in os.environ.get(FAULT_ENV, "").split(",") if ":" in f).get(name)
        if fault == "raise":
            raise RuntimeError(f"fault injected into stage {name} ({FAULT_ENV})")
        if fault == "hang":
            time.sleep(10 ** 6)
        import jax
        from benchmarks.accelerator_stages import PRESETS, STAGES
        dev = jax.devices()[0]
        record["device"] = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
                            "num_devices": jax.device_count(), "jax": jax.__version__}
        flush()
        settings = dict(PRESETS[preset][name], kg_root=kg_root)
        STAGES[name](settings, started + seconds, record["result"], flush)
        record["status"] = "ok"
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the record says what stopped it
        record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    flush()


# -- parent: every stage, each in its own process ----------------------------------------------------------

def _stop(proc) -> None:
    """SIGTERM, then SIGKILL, to the stage's process group (it runs in a session of its own)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def launch(name: str, preset: str, out_dir: str, seconds: float, kg_root: str = "") -> dict:
    """Runs one stage in a child process, killed (its whole process group) at seconds + grace."""
    path = os.path.join(out_dir, "stages", f"{name}.json")
    log = os.path.join(out_dir, "logs", f"{name}.log")
    if os.path.exists(path):
        os.remove(path)
    env = dict(os.environ)
    if preset == "cpu-smoke":
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    cmd = [sys.executable, "-m", "benchmarks.accelerator", "--stage", name, "--preset", preset,
           "--out", out_dir, "--stage-seconds", f"{seconds:.1f}", "--kg-root", kg_root]
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=seconds + grace(seconds))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except BaseException:  # the parent interrupted: take the stage down with it
            _stop(proc)
            raise
    record = {"stage": name, "status": "error", "result": {}}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    record["wall_s"] = time.time() - started
    record["returncode"] = proc.returncode
    if timed_out:
        record.update(status="timeout", error=f"killed after {record['wall_s']:.0f} s "
                                              f"(share {seconds:.0f} s + grace {grace(seconds):.0f} s)")
    elif record["status"] == "running":  # died without a word (crash, out of memory)
        record.update(status="error", error=f"process ended with status {proc.returncode}")
    if record["status"] != "ok":
        with open(log, errors="replace") as f:
            record["log_tail"] = f.read()[-4000:]
    return record


def run_all(preset: str, out_dir: str, budget: float, stages: list, kg_root: str = "") -> dict:
    os.makedirs(os.path.join(out_dir, "stages"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    started = time.time()
    results = {"preset": preset, "budget_s": budget, "host": host(), "device": None,
               "date": time.strftime("%Y-%m-%d", time.gmtime()), "stages": {}}
    for i, name in enumerate(stages):
        left = budget - (time.time() - started)
        seconds = share(left, stages[i:])
        print(f"[accelerator] {name}: {seconds:.0f} s of the {left:.0f} s left", flush=True)
        rec = launch(name, preset, out_dir, seconds, kg_root)
        results["stages"][name] = rec
        results["device"] = results["device"] or rec.get("device")
        results["wall_s"] = time.time() - started
        write_json(os.path.join(out_dir, "results.json"), results)
        with open(os.path.join(out_dir, "results.md"), "w") as f:
            f.write(markdown(results))
        print(f"[accelerator] {name}: {rec['status']} in {rec['wall_s']:.0f} s"
              + (f" ({rec.get('error')})" if rec["status"] != "ok" else ""), flush=True)
    return results


# -- markdown ------------------------------------------------------------------------------------------------

def _f(v, spec=".3g"):
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def headline(name: str, r: dict) -> str:
    if name == "kernels":
        done = [c for c in r.get("compile", []) if c.get("status") == "ok"]
        fwd = [x for x in r.get("bandwidth", []) if x.get("mode") == "fwd" and x.get("gbps")]
        best = max(fwd, key=lambda x: x["gbps"], default=None)
        swept = [x for x in r.get("sweep", []) if not x.get("error")]
        return (f"{r.get('passed', 0)}/{len(r.get('cases', []))} cases within tolerance; compiled "
                f"{len(done)}/{len(r.get('compile', []))}"
                + (f"; best forward {_f(best['gbps'])} GB/s" if best else "")
                + (f" ({best['pct_peak']:.0f}% of peak)" if best and best.get("pct_peak") is not None else "")
                + f"; sweep {len(swept)}/{len(r.get('sweep', []))} configs")
    if name == "bench":
        fwd = [x for x in r.get("rows", []) if x["mode"] == "fwd"]
        best = max(fwd, key=lambda x: x["gbps"], default=None)
        return f"{len(r.get('rows', []))} rows" + (f"; best forward {_f(best['gbps'])} GB/s"
                                                   f" ({_f(best['pct_peak'], '.0f')}% of peak)" if best else "")
    if name == "lm" and "tokens_per_s" in r:
        return (f"{_f(r['params'] / 1e6)}M params, {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%} of the "
                f"measured bf16 peak {_f(r['measured_bf16_peak_flops'] / 1e12)} TFLOP/s")
    if name == "nfe" and "step_ms" in r:
        return f"{r['steps_per_s']:.1f} steps/s, projected epoch {r['epoch_s']:.1f} s ({r['steps_per_epoch']} steps)"
    if name == "fidelity" and r.get("table"):
        t = r["table"]
        return f"{r['steps']} steps per model; ppl ratio {t[0]['ratio']:.2f} (first bin) -> {t[-1]['ratio']:.2f} (last)"
    return ""


def stage_markdown(name: str, r: dict) -> list:
    if name == "kernels" and "steps" in r:
        lines = [f"Implementation {r['implementation']}{' (interpret)' if r['interpret'] else ''}. Steps: "
                 + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f} s)" for k, v in r["steps"].items()) + ".", ""]
        lines += [f"- step {k}: {v['error']}" for k, v in r["steps"].items() if v.get("error")]
        lines += ["### compile (forward+backward)", "",
                  "| B | L | D | H | dtype | status | compile s | temp MB | kernel calls | warnings / error |",
                  "|" + "---|" * 10]
        for c in r.get("compile", []):
            note = c.get("error") or "; ".join(c.get("warnings", []))
            lines.append(f"| {c['B']} | {c['L']} | {c['D']} | {c['H']} | {c['dtype']} | {c['status']} | "
                         f"{_f(c.get('compile_s'))} | {_f(c.get('temp_mb'))} | {_f(c.get('kernel_calls'))} | "
                         f"{note.replace('|', '/')[:200]} |")
        lines += ["", "### correctness against the fp32 XLA reference", "",
                  "Errors are max |kernel - reference|; a case passes when every error is within "
                  "tol * (max(1, max|ref|) + |ref|), tol fp32 1e-4 / 1e-3 (fwd / grad), bf16 3e-2 / 6e-2, and dx "
                  "is exactly 0 in the padding.", "",
                  "| case | B | L | D | H | head tiles | dtype | fwd err | dx err | dq err | max dx padding | status |",
                  "|" + "---|" * 12]
        for c in r.get("cases", []):
            status = c["status"] + (f": {c['error']}" if c.get("error") else "")
            lines.append(f"| {c['name']} | {c['B']} | {c['L']} | {c['D']} | {c['H']} | {_f(c.get('head_tiles'))} | "
                         f"{c['dtype']} | {_f(c.get('fwd_max_err'))} | {_f(c.get('dx_max_err'))} | "
                         f"{_f(c.get('dq_max_err'))} | {_f(c.get('dx_pad_max'))} | {status.replace('|', '/')[:200]} |")
        if r.get("bandwidth_table"):
            lines += ["", f"### bandwidth (peak {_f(r.get('peak_gbps'))} GB/s)", "", r["bandwidth_table"]]
        if r.get("sweep_table") or r.get("notes"):
            lines += ["", "### sweep", ""] + [f"- {n}" for n in r.get("notes", [])]
            lines += ([""] if r.get("notes") else []) + [r.get("sweep_table", "")]
        return lines
    if name == "bench":
        return ([r["table"]] if r.get("table") else []) + [f"- {e}" for e in r.get("errors", [])]
    if name == "lm" and "tokens_per_s" in r:
        return ["| params | batch x seq | dtype | optimizer | step ms | tokens/s | MFU (measured peak) | "
                "MFU (spec peak) | bf16 matmul peak TFLOP/s | peak mem GiB |", "|" + "---|" * 10,
                f"| {r['params'] / 1e6:.1f}M | {r['batch']}x{r['seq']} | {r['dtype']} | {r['optimizer']} | "
                f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
                f"{'-' if r['mfu_spec'] is None else format(r['mfu_spec'], '.1%')} | "
                f"{_f(r['measured_bf16_peak_flops'] / 1e12)} | {r['peak_memory_gib']:.1f} |"]
    if name == "nfe" and "step_ms" in r:
        return ["| dataset | model | dim | batch | step ms | steps/s | triples/s | steps/epoch | epoch s | "
                "rank valid s |", "|" + "---|" * 10,
                f"| {r['dataset']} | {r['model']} | {r['dim']} | {r['batch']} | {r['step_ms']:.2f} | "
                f"{r['steps_per_s']:.1f} | {r['triples_per_s']:,.0f} | {r['steps_per_epoch']} | {r['epoch_s']:.1f} | "
                f"{_f(r.get('valid_rank_s'))} |"]
    if name == "fidelity" and r.get("table"):
        m = r["models"]
        lines = [f"{m['standard']['parameters'] / 1e6:.1f}M parameters each, {r['steps']} steps of "
                 f"{r['batch']}x{r['seq_len']} bytes ({r['tokens_per_model'] / 1e6:.0f}M tokens) on "
                 f"{r['data']}; held-out perplexity per byte by context position ({r['eval_rows']} rows):", "",
                 "| positions | standard | lexinvariant | ratio |", "|---|---|---|---|"]
        for row in r["table"]:
            lines.append(f"| {row['positions']} | {row['standard']:.2f} | {row['lexinvariant']:.2f} | "
                         f"{row['ratio']:.2f} |")
        return lines
    return []


def markdown(res: dict) -> str:
    h, d = res["host"], res.get("device") or {}
    lines = [f"# Accelerator check ({res['date']}, preset {res['preset']})", "",
             f"Device: {d.get('device', '?')} ({d.get('backend', '?')}, {d.get('num_devices', '?')} device(s)), "
             f"host {h['cpu_model']} ({h['cpu_count']} CPUs), jax {d.get('jax', '?')}, Python {h['python']}; "
             f"budget {res['budget_s']:.0f} s, wall {res.get('wall_s', 0):.0f} s.", "",
             "| stage | status | seconds | summary |", "|---|---|---|---|"]
    for name, rec in res["stages"].items():
        summary = headline(name, rec.get("result", {})) if rec["status"] == "ok" else rec.get("error", "")
        lines.append(f"| {name} | {rec['status']} | {rec['wall_s']:.0f} | {summary.replace('|', '/')} |")
    for name, rec in res["stages"].items():
        body = stage_markdown(name, rec.get("result", {}))
        if body:
            lines += ["", f"## {name}", ""] + body
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for results.json, results.md, logs/ and stages/")
    p.add_argument("--preset", choices=("gpu", "cpu-smoke"), default="gpu")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"total time budget in seconds (default {DEFAULT_BUDGET})")
    p.add_argument("--stages", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--kg-root", default="", help="directory holding WN18RR/ (default: experiments/configs/kge.py "
                                                 "DATA_ROOT, ../shared/data/kg beside the checkout)")
    p.add_argument("--stage", help=argparse.SUPPRESS)                  # child mode: run this one stage
    p.add_argument("--stage-seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        run_stage(args.stage, args.preset, args.out, args.stage_seconds, args.kg_root)
        return None
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in ORDER]
    if unknown or not stages:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; expected a comma-separated subset of "
                         f"{','.join(ORDER)}")
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET[args.preset]
    if budget <= 0:
        raise ValueError(f"--budget-s must be positive, got {budget}")
    kg_root = os.path.abspath(args.kg_root) if args.kg_root else ""
    res = run_all(args.preset, os.path.abspath(args.out), budget, stages, kg_root)
    print(markdown(res))
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return res


if __name__ == "__main__":
    if "--stage" in sys.argv:  # a child: run_stage records every error itself
        main()
    else:
        from experiments.harness import run_cli
        run_cli(main)  # one-line errors for bad input; tcmalloc on CPU-only machines
