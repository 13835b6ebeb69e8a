"""Pallas kernels for jaxemb, one folder per op; each has an XLA reference."""
from .attention_pool import attention_pool, attention_pool_sharded

__all__ = ["attention_pool", "attention_pool_sharded"]
