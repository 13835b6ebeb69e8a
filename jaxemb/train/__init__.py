"""The one training core shared by every jaxemb system."""
from jaxemb.train.constants import Pretrained, load_tree, logical, save_tree
from jaxemb.train.defaults import core_config
from jaxemb.train.mesh import DEFAULT_RULES, make_mesh
from jaxemb.train.task import BatchSource, Task
from jaxemb.train.trainer import FitResult, NonFiniteLoss, Trainer

__all__ = ["BatchSource", "DEFAULT_RULES", "FitResult", "NonFiniteLoss", "Pretrained", "Task", "Trainer",
           "core_config", "load_tree", "logical", "make_mesh", "save_tree"]
