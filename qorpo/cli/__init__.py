"""The `qorpo` command line (entry point `qorpo.cli:main`). Importing it, `qorpo --help` and
`qorpo --version` load no torch: each command imports the heavy modules when it runs.

Modules, each importing only those listed before it:
report.py    consoles; user errors -> one line and an exit code (tracebacks only with --debug)
train.py     `qorpo train`: one option per TrainConfig field
estimate.py  `qorpo estimate`: memory from a model's config.json
merge.py     `qorpo merge`: options and the result table (GGUF rows too)
eval.py      `qorpo eval`: held-out pairs, base vs adapters (qorpo.evaluation)
plot.py      `qorpo plot`: training curves of runs (qorpo.plot)
app.py       the Typer app: --version, --debug, the commands registered; main()
"""

from qorpo.cli.app import app, main

__all__ = ["app", "main"]
