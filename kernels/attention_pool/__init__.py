"""Attention pooling: H learned queries attend over a padded or packed sequence."""
from .api import attention_pool
from .sharded import attention_pool_sharded

__all__ = ["attention_pool", "attention_pool_sharded"]
