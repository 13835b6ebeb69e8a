"""Location-encoder speed: jaxemb's spherical harmonics (stable recurrence) + SIREN against the reference's
approach written in PyTorch (closed-form harmonics degree by degree, then the same SIREN), CPU.

    python -m benchmarks.spatial_speed                          # L 20 and 40, batch 4096
    python -m benchmarks.spatial_speed --legendre 10,20 --batch 1024 --reps 5 --note /tmp/spatial.md

Both encoders get the same weights (jaxemb's init copied into torch) and the same random (lon, lat)
points. The PyTorch peer evaluates each associated Legendre function P_lm from its explicit polynomial
in cos(theta) (coefficients from Rodrigues' formula, as SatCLIP's spherical_harmonics_basis does with
closed forms per degree), times sin^m(theta) and cos/sin(m phi); jaxemb runs the three-term recurrence.
Both produce the same orthonormal real basis (no Condon-Shortley phase), features ordered l, then m = -l..l.
Forward (eval mode, torch under no_grad) and forward+backward (train mode with dropout; gradient of
mean(embedding^2) w.r.t. every parameter) are timed interleaved (jax fwd, torch fwd, jax fwd+bwd, torch
fwd+bwd per repetition) after one warm-up each; medians. torch uses one intra-op thread per core, as XLA.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from fractions import Fraction
from functools import lru_cache

import numpy as np

from benchmarks.common import host

# ---------------------------------------------------------------- the PyTorch peer


@lru_cache(maxsize=None)
def legendre_coefficients(l: int, m: int) -> tuple:
    """Coefficients c_k (k = 0..l-m, of x^k) of d^m/dx^m P_l(x), exact (Rodrigues: P_l = 2^-l sum_j (-1)^j
    C(l, j) C(2l - 2j, l) x^(l - 2j)), as floats."""
    c = [Fraction(0)] * (l + 1)
    for j in range(l // 2 + 1):
        c[l - 2 * j] = Fraction((-1) ** j * math.comb(l, j) * math.comb(2 * l - 2 * j, l), 2 ** l)
    for _ in range(m):
        c = [k * c[k] for k in range(1, len(c))]
    return tuple(float(v) for v in c)


def torch_harmonics(lonlat, L: int):
    """(N, L^2) real orthonormal spherical harmonics of degree < L at (N, 2) (lon, lat) degrees, closed
    form per (l, m), in lonlat's dtype: Y_lm = N_lm sin^m(theta) P_l^(m)(cos theta) x {1, sqrt2 cos(m phi),
    sqrt2 sin(m phi)}, N_lm = sqrt((2l + 1) / 4pi (l - m)! / (l + m)!)."""
    import torch
    lat, phi = torch.deg2rad(lonlat[:, 1]), torch.deg2rad(lonlat[:, 0])
    x, s = torch.sin(lat), torch.cos(lat)  # cos and sin of the colatitude
    out = []
    for l in range(L):
        row = {}
        for m in range(l + 1):
            poly = torch.zeros_like(x)
            for c in reversed(legendre_coefficients(l, m)):  # Horner
                poly = poly * x + c
            norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.exp(math.lgamma(l - m + 1) - math.lgamma(l + m + 1)))
            p = norm * s ** m * poly
            if m == 0:
                row[0] = p
            else:
                row[m] = math.sqrt(2) * p * torch.cos(m * phi)
                row[-m] = math.sqrt(2) * p * torch.sin(m * phi)
        out += [row[m] for m in range(-l, l + 1)]
    return torch.stack(out, dim=1)


def torch_encoder(params: dict, L: int, w0_first: float, w0: float, dropout: float):
    """A torch.nn.Module with jaxemb LocationEncoder's weights `params` (numpy, unboxed):
    closed-form harmonics, sine layers sin(w0 * dropout(x W + b)), a plain last layer."""
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            names = sorted(k for k in params if k.startswith("siren_")) + ["out"]
            self.layers = nn.ModuleList()
            for n in names:
                w, b = np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"])
                lin = nn.Linear(w.shape[0], w.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(w.T.copy()))
                    lin.bias.copy_(torch.from_numpy(b.copy()))
                self.layers.append(lin)
            self.drop = nn.Dropout(dropout)

        def forward(self, lonlat):
            x = torch_harmonics(lonlat, L).to(torch.float32)
            for i, lin in enumerate(self.layers[:-1]):
                x = torch.sin((w0_first if i == 0 else w0) * self.drop(lin(x)))
            return self.layers[-1](x)

    return Encoder()


# ---------------------------------------------------------------- the pair


def points(batch: int, seed: int = 0) -> np.ndarray:
    """(batch, 2) float32 (lon, lat) uniform on the sphere."""
    rng = np.random.default_rng(seed)
    return np.c_[rng.uniform(-180, 180, batch), np.degrees(np.arcsin(rng.uniform(-1, 1, batch)))].astype(np.float32)


class Pair:
    """jaxemb's LocationEncoder and the PyTorch peer on the same weights and points."""

    def __init__(self, L: int, batch: int, hidden: int = 128, layers: int = 2, dim: int = 16,
                 dropout: float = 0.1, seed: int = 0, threads: int = 0):
        import jax
        import jax.numpy as jnp
        import torch
        from jaxemb.models.spatial import LocationEncoder
        from jaxemb.train.constants import unbox
        self.L, self.batch, self.hidden, self.layers, self.dim = L, batch, hidden, layers, dim
        self.threads = threads or os.cpu_count()
        self.lonlat = points(batch, seed)
        enc = LocationEncoder(legendre=L, hidden=hidden, layers=layers, dim=dim, dropout=dropout)
        x = jnp.asarray(self.lonlat)
        params = unbox(enc.init({"params": jax.random.key(seed)}, x))
        self.params = jax.device_put(params)
        self.torch_model = torch_encoder(jax.device_get(params)["params"], L, enc.w0_first, enc.w0, dropout)
        self.x_t = torch.from_numpy(self.lonlat)
        self.num_params = sum(p.numel() for p in self.torch_model.parameters())
        fwd = jax.jit(lambda p, x: enc.apply(p, x))

        def loss(p, x, rng):
            return jnp.mean(jnp.square(enc.apply(p, x, train=True, rngs={"dropout": rng})))

        grad = jax.jit(jax.value_and_grad(loss))
        rng = jax.random.key(seed + 1)
        self.jax = {"fwd": lambda: jax.block_until_ready(fwd(self.params, x)),
                    "fwd+bwd": lambda: jax.block_until_ready(grad(self.params, x, rng))}
        self.torch = {"fwd": self._torch_fwd, "fwd+bwd": self._torch_fwd_bwd}

    def _torch_fwd(self):
        import torch
        torch.set_num_threads(self.threads)
        self.torch_model.eval()
        with torch.no_grad():
            return self.torch_model(self.x_t)

    def _torch_fwd_bwd(self):
        import torch
        torch.set_num_threads(self.threads)
        self.torch_model.train()
        loss = self.torch_model(self.x_t).pow(2).mean()
        loss.backward()
        grads = [p.grad for p in self.torch_model.parameters()]
        self.torch_model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    def outputs(self):
        """(jaxemb, torch) eval-mode embeddings as numpy float32."""
        return np.asarray(self.jax["fwd"]()), self._torch_fwd().numpy()


def measure(pair: Pair, reps: int) -> list:
    """Rows per mode: medians of `reps` interleaved timings after one warm-up each."""
    times = {(fw, mode): [] for fw in ("jax", "torch") for mode in ("fwd", "fwd+bwd")}
    steps = {"jax": pair.jax, "torch": pair.torch}
    for fw, mode in times:
        steps[fw][mode]()  # warm-up (JAX: compilation)
    for _ in range(reps):
        for mode in ("fwd", "fwd+bwd"):
            for fw in ("jax", "torch"):
                t = time.perf_counter()
                steps[fw][mode]()
                times[(fw, mode)].append(time.perf_counter() - t)
    j, t = pair.outputs()
    acc = harmonics_errors(pair)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        js, ts = (float(np.median(times[(fw, mode)])) for fw in ("jax", "torch"))
        rows.append({"L": pair.L, "features": pair.L ** 2, "batch": pair.batch, "hidden": pair.hidden,
                     "layers": pair.layers, "dim": pair.dim, "params": pair.num_params, "mode": mode,
                     "reps": reps, "torch_threads": pair.threads, "jax_s": js, "torch_s": ts,
                     "jax_loc_s": pair.batch / js, "torch_loc_s": pair.batch / ts, "ratio": ts / js,
                     "max_abs_diff": finite_or_none(np.abs(j - t).max()), **acc})
    return rows


def finite_or_none(x):
    """float(x), or None when it is NaN/inf (JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def harmonics_errors(pair: Pair) -> dict:
    """Max abs error of each side's float32 harmonics at the batch's points against the float64 recurrence
    (None when non-finite) and the number of non-finite torch closed-form values."""
    import jax.numpy as jnp
    from jaxemb.models.spatial import spherical_harmonics, spherical_harmonics_jnp
    ref = spherical_harmonics(pair.lonlat.astype(np.float64), pair.L)
    ours = np.asarray(spherical_harmonics_jnp(jnp.asarray(pair.lonlat), pair.L), np.float64)
    peer = torch_harmonics(pair.x_t, pair.L).numpy().astype(np.float64)
    return {"sh_err_jax": finite_or_none(np.abs(ours - ref).max()),
            "sh_err_torch": finite_or_none(np.abs(peer - ref).max()),
            "torch_sh_nonfinite": int((~np.isfinite(peer)).sum())}


def table(rows: list, info: dict) -> str:
    m = info["host"]
    head = (f"Location encoder (SH + SIREN {rows[0]['layers']} x {rows[0]['hidden']} -> {rows[0]['dim']}) "
            f"throughput, locations/s (medians of interleaved runs)\n"
            f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs; jax {info['versions']['jax']}, torch "
            f"{info['versions']['torch']} ({rows[0]['torch_threads']} threads); load "
            f"{info['load'][0]:.2f} -> {info['load'][1]:.2f}\n\n")
    lines = ["| L | features | batch | mode | jaxemb loc/s | PyTorch closed-form loc/s | jaxemb / PyTorch | "
             "SH error jaxemb | SH error PyTorch | embedding diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    err = lambda v: "non-finite" if v is None else f"{v:.1e}"
    for r in rows:
        lines.append(f"| {r['L']} | {r['features']} | {r['batch']} | {r['mode']} | {r['jax_loc_s']:,.0f} | "
                     f"{r['torch_loc_s']:,.0f} | {r['ratio']:.2f}x | {err(r['sh_err_jax'])} | "
                     f"{err(r['sh_err_torch'])} | {err(r['max_abs_diff'])} |")
    note = ("\nSH error: max abs error of the float32 harmonics at the batch's points against jaxemb's float64 "
            "recurrence; embedding diff: max abs difference of the two encoders' eval outputs on the same weights.\n")
    return head + "\n".join(lines) + "\n" + note


def versions() -> dict:
    import jax
    import torch
    return {"jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__}


def int_list(text: str, flag: str) -> list:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}; expected comma-separated positive integers") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag}={text!r}; expected comma-separated positive integers")
    return vals


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--legendre", default="20,40", help="numbers of degrees L, comma-separated")
    p.add_argument("--batch", type=int, default=4096, help="locations per step")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per framework and mode")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: one per core)")
    p.add_argument("--out", default="runs/bench_spatial/results.json", help="JSON results file")
    p.add_argument("--note", default="", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    Ls = int_list(args.legendre, "--legendre")
    if args.batch < 1 or args.reps < 1:
        raise ValueError(f"--batch {args.batch} and --reps {args.reps} must be >= 1")
    load = os.getloadavg()[0]
    rows = []
    for L in Ls:
        pair = Pair(L, args.batch, args.hidden, args.layers, args.dim, threads=args.threads)
        new = measure(pair, args.reps)
        for r in new:
            print(json.dumps(r), flush=True)
        rows += new
    info = {"host": host(), "versions": versions(), "load": (load, os.getloadavg()[0]),
            "argv": list(sys.argv[1:] if argv is None else argv)}
    text = table(rows, info)
    print("\n" + text)
    out = {"rows": rows, **info}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from experiments.harness import write_json
    write_json(args.out, out)
    if args.note:
        with open(args.note, "w") as f:
            f.write(text)
    return out


if __name__ == "__main__":
    from experiments.harness import run_cli
    run_cli(main)
