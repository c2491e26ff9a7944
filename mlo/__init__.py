"""mlo: gradient-based multilevel optimization in plain PyTorch."""

from . import hypergrad, linsolve, loggers, meta, optim
from .errors import (CheckpointError, DistributedError, GraphError, HandleError, LevelError,
                     LossError, MloError, MloWarning, NonFiniteError, OptimizerError)
from .graph import Graph
from .level import Init, Level, Lower, Upper, level, registry
from .program import Program

__version__ = "0.1.0"

__all__ = ["level", "Program", "Upper", "Lower", "Init", "Level", "Graph", "registry", "hypergrad",
           "linsolve", "loggers", "meta", "optim", "MloError", "LevelError", "GraphError",
           "LossError", "OptimizerError", "NonFiniteError", "CheckpointError", "DistributedError",
           "HandleError", "MloWarning"]
