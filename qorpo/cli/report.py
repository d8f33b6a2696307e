"""How the commands report: the consoles, and user errors turned into one line and an exit code.

Every user-fixable problem is a QorpoError, caught once here and printed as one or two lines
(exit 1, a bad config 2) — the traceback only with `qorpo --debug` or QORPO_DEBUG=1. Anything
else is a bug: its traceback is printed with a request to report it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from qorpo.errors import (
    ConfigError,
    MergeVerificationError,
    QorpoError,
    Terminated,
    terminate_as_interrupt,
)

console = Console()
# Errors are not wrapped by rich: paths stay whole in logs, the terminal wraps them itself.
err_console = Console(stderr=True, soft_wrap=True)
ISSUES_URL = "https://github.com/qorpo/qorpo/issues"
T = TypeVar("T")


def _debug() -> bool:
    return os.environ.get("QORPO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run_reporting_errors(action: Callable[[], T]) -> T:
    """Run a command's work; turn user errors into a clean message and an exit code."""
    try:
        with terminate_as_interrupt():
            return action()
    except QorpoError as exc:
        if _debug():
            raise
        rank = _rank_prefix()
        if rank:  # under torchrun/accelerate: say which process failed
            err_console.print(f"{rank}[bold red]error:[/] {escape(str(exc))}")
        elif isinstance(exc, ConfigError):
            err_console.print(f"[red]{escape(str(exc))}[/]")
        elif isinstance(exc, MergeVerificationError):
            err_console.print(f"[bold red]verification failed[/] (nothing written): "
                              f"{escape(str(exc))}")
        else:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    except Terminated:
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:
        if _peer_failed(exc):  # the process that failed has printed its own message
            err_console.print(f"{_rank_prefix()}stopped: another process of this run failed "
                              "(its error is printed above).")
            raise typer.Exit(1) from None
        err_console.print(f"[bold red]qorpo hit an internal error[/] (a bug, not your mistake). "
                          f"Please report it at {ISSUES_URL} with the command you ran and the "
                          "traceback below.")
        raise


def _rank_prefix() -> str:
    """'[rank 1] ' under torchrun / accelerate launch with several processes, else ''."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return escape(f"[rank {os.environ.get('RANK', '?')}] ")  # not a rich markup tag
    return ""


def _peer_failed(exc: BaseException) -> bool:
    """A collective broke because another process died (gloo: 'Connection closed by peer',
    NCCL: DistBackendError) — a consequence, not the cause."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(exc)
    return (type(exc).__name__ == "DistBackendError" or "closed by peer" in text
            or "remote worker" in text or "NCCL communicator was aborted" in text)
