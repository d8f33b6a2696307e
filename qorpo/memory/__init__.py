"""Training memory: how much a run needs (estimate) and what fits (plan).

shapes.py   the model numbers memory depends on, from a config (no weights)
formula.py  the estimate, component by component, for CUDA and for the CPU
plan.py     an estimate for one run (its data's real lengths, layout, device) and the knobs
options.py  EstimateConfig: `qorpo estimate`'s options (flags, API: plan.estimate_run, docs)
table.py    the tables of docs/memory.md
"""

from qorpo.memory.formula import GIB, MemoryEstimate, Workload, estimate
from qorpo.memory.shapes import MODELS, ModelShape, shape_from_config

__all__ = ["GIB", "MODELS", "MemoryEstimate", "ModelShape", "Workload", "estimate",
           "shape_from_config"]
