"""Small tasks and sources for training-core tests."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class Regression:
    """Linear least squares with a logically-partitioned weight; deterministic (ignores rng)."""
    tokens_per_example = 1

    def __init__(self, dim=16, out=8):
        self.dim, self.out = dim, out

    def init(self, rng, batch):
        w = nn.with_logical_partitioning(nn.initializers.normal(0.1), ("embed", "mlp"))(rng, (self.dim, self.out))
        return {"w": w}

    def loss(self, params, batch, rng):
        pred = batch["x"] @ params["w"]
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, {"mse": loss}


class ArraySource:
    """Batch i = rows [i*B, (i+1)*B) of fixed arrays (wrapping)."""

    def __init__(self, arrays: dict, batch_size: int):
        self.arrays, self.batch_size = arrays, batch_size
        self.n = len(next(iter(arrays.values())))

    def get(self, index, rows=slice(None)):
        idx = (np.arange(self.batch_size) + index * self.batch_size) % self.n
        return {k: v[idx][rows] for k, v in self.arrays.items()}


def regression_data(n=256, dim=16, out=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = rng.normal(size=(dim, out)).astype(np.float32)
    return {"x": x, "y": (x @ w).astype(np.float32)}


def close_to_reference(got, want, rtol=1e-5):
    """|got - want| <= rtol * max(1, max |want|): a port against its reference implementation in fp32."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), max(1.0, np.abs(want).max())
    assert err <= rtol * scale, f"max |diff| {err:.3g} at scale {scale:.3g}"
