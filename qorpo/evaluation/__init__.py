"""`qorpo eval`: held-out preference pairs scored with the training loss path, base and each
adapter side by side (docs/eval.md).

inputs.py  what is scored: base, adapters (run / checkpoint folders), the run's settings
score.py   the base loaded once, adapters switched by name; per-pair statistics; generation
run.py     evaluate() → EvalResult; the tables
"""

from qorpo.evaluation.run import EvalResult, eval_table, evaluate, generations_table

__all__ = ["EvalResult", "eval_table", "evaluate", "generations_table"]
