"""The one training core shared by every jaxemb system."""
from jaxemb.train.defaults import core_config
from jaxemb.train.mesh import DEFAULT_RULES, make_mesh
from jaxemb.train.task import BatchSource, Task
from jaxemb.train.trainer import NonFiniteLoss, Trainer

__all__ = ["BatchSource", "DEFAULT_RULES", "NonFiniteLoss", "Task", "Trainer", "core_config", "make_mesh"]
