"""`qorpo estimate`: one option per EstimateConfig field, generated (flags, API and docs share
it); the work is qorpo.memory.plan.estimate_run's."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from qorpo.cli.options import with_options
from qorpo.cli.report import console, run_reporting_errors
from qorpo.memory.options import EstimateConfig


@with_options(EstimateConfig)
def estimate_command(
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    **options: Any,
) -> None:
    """How much memory a run needs before you have data: worst-case pairs of --max-length."""

    def work() -> None:
        from qorpo.memory.plan import estimate_run

        config = EstimateConfig.from_dict({k: v for k, v in options.items() if v is not None},
                                          source="options")
        report = estimate_run(config)
        if json_out:
            print(json.dumps(report.to_json()))
            return
        from qorpo.progress import estimate_table

        console.print(estimate_table(report.estimate, f"{report.model}, {report.batch_size} "
                                     f"× {report.max_length} tokens"))
        if report.largest:
            best, context = report.largest, report.context
            said = f" (the model's context: {context:,})" if context else ""
            console.print(f"Largest --max-length at --batch-size 1: "
                          f"{best['max_length_at_batch_1'] or 'none'}{said}; largest "
                          f"--batch-size at --max-length {report.max_length}: "
                          f"{best['batch_at_max_length'] or 'none'}.")

    run_reporting_errors(work)
