"""What a config asks of the installed packages, checked before anything loads: the optimizer
and scheduler names (transformers' own lists), the loggers and optimizers that need a package,
the attention kernel. One ConfigError lists every problem with its fix.

Not in qorpo.config on purpose: these checks import transformers (and torch), and the config
must stay light (`qorpo --help` loads no torch).
"""

from __future__ import annotations

import difflib
import importlib.util

from qorpo.config import TrainConfig
from qorpo.errors import ConfigError

# Optimizers that need a package of their own: name prefix -> (module, pip name). Checked in
# order, first match wins (adamw_torch_8bit is torchao's, the other *8bit ones bitsandbytes').
_OPTIMIZER_PACKAGES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("adamw_torch_4bit", "adamw_torch_8bit"), "torchao", "torchao"),
    (("lomo", "adalomo"), "lomo_optim", "lomo-optim"),
    (("grokadamw",), "grokadamw", "grokadamw"),
    (("schedule_free_",), "schedulefree", "schedulefree"),
    (("stable_adamw",), "optimi", "torch-optimi"),
    (("adamw_anyprecision",), "torchdistx", "torchdistx"),
    (("adamw_torch_xla",), "torch_xla", "torch_xla"),
    (("adamw_torch_npu_fused",), "torch_npu", "torch_npu"),
    (("adamw_bnb", "adamw_8bit", "ademamix", "lion", "paged_", "rmsprop_bnb"),
     "bitsandbytes", "bitsandbytes"),
)
# GaLore/APOLLO project the *full* weights' gradients: they need `optim_target_modules`, which
# qorpo does not pass (LoRA already trains low-rank adapters).
_LOW_RANK_OPTIMIZERS = ("galore_", "apollo_")
# Schedulers that need settings (`lr_scheduler_kwargs`) qorpo does not pass.
_SCHEDULER_NEEDS = {"cosine_with_min_lr": "min_lr", "cosine_warmup_with_min_lr": "min_lr",
                    "warmup_stable_decay": "num_decay_steps"}
# Schedulers stepped by eval results.
_EVAL_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
_LOGGER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
                    "wandb": (("wandb",), "wandb")}


def check_environment(cfg: TrainConfig) -> None:
    """Raise one ConfigError listing every problem of `cfg` with this machine's packages (and
    device, for the attention kernel); return quietly when there is none."""
    from qorpo.model import attn_problems, device_of_process

    problems = [*_optimizer_problems(cfg.optim), *_scheduler_problems(cfg),
                *_logger_problems(cfg.report_to),
                *attn_problems(cfg.attn_implementation, device_of_process())]
    if problems:
        raise ConfigError(problems)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install counts as missing
        return False


def _unknown(flag: str, value: str, names: list[str]) -> str:
    close = difflib.get_close_matches(value, names, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{flag} {value!r} is not a valid name{hint}; use one of: {', '.join(names)}"


def _optimizer_problems(optim: str) -> list[str]:
    from transformers.training_args import OptimizerNames

    if optim == "auto":
        return []
    names = [o.value for o in OptimizerNames]
    if optim not in names:  # (the names listed: those that would run here)
        return [_unknown("--optim", optim,
                         ["auto", *(n for n in names if not _optimizer_problem(n))])]
    problem = _optimizer_problem(optim)
    return [problem] if problem else []


def _optimizer_problem(optim: str) -> str | None:
    """Why transformers' optimizer `optim` cannot run in qorpo here, or None."""
    if optim.startswith(_LOW_RANK_OPTIMIZERS):
        return (f"--optim {optim} needs optim_target_modules, which qorpo does not set (GaLore/"
                "APOLLO project full-weight gradients; LoRA already trains low-rank adapters): "
                "use auto or adamw_torch")
    for prefixes, module, pip_name in _OPTIMIZER_PACKAGES:
        if optim.startswith(prefixes) and not _installed(module):
            return (f"--optim {optim} needs the {pip_name} package, which is not installed: "
                    f"pip install {pip_name} (or use --optim auto)")
    return None


def _scheduler_problems(cfg: TrainConfig) -> list[str]:
    from transformers.trainer_utils import SchedulerType

    name = cfg.lr_scheduler
    names = [s.value for s in SchedulerType]
    if name not in names:
        return [_unknown("--lr-scheduler", name, [n for n in names if n not in _SCHEDULER_NEEDS])]
    if name in _SCHEDULER_NEEDS:
        return [f"--lr-scheduler {name} needs a {_SCHEDULER_NEEDS[name]} setting that qorpo "
                "does not pass: use linear, cosine or constant_with_warmup"]
    has_eval = bool(cfg.eval_data or cfg.eval_split or cfg.eval_fraction > 0)
    if name in _EVAL_SCHEDULERS and not (has_eval and cfg.eval_steps):
        return [f"--lr-scheduler {name} changes the rate from eval results: give eval data "
                "(--eval-data, --eval-split or --eval-fraction) and --eval-steps, or use "
                "linear or cosine"]
    return []


def _logger_problems(report_to: list[str]) -> list[str]:
    problems = []
    for name in report_to:
        modules, pip_name = _LOGGER_PACKAGES.get(name, ((), ""))
        if modules and not any(_installed(m) for m in modules):
            problems.append(f"--report-to {name} needs the {pip_name} package, which is not "
                            f"installed: pip install {pip_name} (or leave --report-to none)")
    return problems
