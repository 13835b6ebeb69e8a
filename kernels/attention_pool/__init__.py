"""Attention pooling: H learned queries attend over a padded or packed sequence."""
from kernels.attention_pool.api import attention_pool
from kernels.attention_pool.sharded import attention_pool_sharded

__all__ = ["attention_pool", "attention_pool_sharded"]
