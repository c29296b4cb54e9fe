"""The cluster planner: will a run fit a GPU, and how long will it take (docs/scaling.md)."""

from .devices import DEVICES, Device
from .planner import Hardware, Layout, Plan, PlanError, RunShape, Term, evaluate, run_shape
from .search import advise, search

__all__ = ["DEVICES", "Device", "Hardware", "Layout", "Plan", "PlanError", "RunShape", "Term",
           "advise", "evaluate", "run_shape", "search"]
