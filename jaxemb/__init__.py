"""jaxemb: embedding-research systems in JAX/Flax, trained through one sharded training core."""

__version__ = "0.1.0"
