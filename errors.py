"""What every layer of the project may raise, and the small tables that raise it: the bottom of
the import graph (it imports nothing of the project).

    UsageError     a flag or setting that cannot work: one `error:` line, exit 2, before any work
    DataError      a data file that is wrong: it names the file and line
    ModelLoadError a model that will not load, or would load wrongly
    UnknownName    a name not in its table; Choices, a name -> entry dict, raises it listing the valid names
    Check          a numeric flag's valid range: its test and how the error message states it

and the interrupt flag: a Ctrl-C that a library swallowed on its way still stops the loops that
call stop_if_interrupted() (stages.main_guard's handler records it).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable, NamedTuple


class UsageError(ValueError):
    """A flag or setting that cannot work: reported as one `error:` line, exit 2, before any work."""


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and line or row)."""


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, or would be loaded wrongly."""


class UnknownName(KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class Choices(dict):
    """A name -> entry dict whose failed lookups list the valid names (methods.LOSSES, models.MODELS, ...)."""

    def __init__(self, kind: str, entries: dict):
        super().__init__(entries)
        self.kind = kind

    def __missing__(self, name):
        raise UnknownName(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self))}")

    def check(self, name: str) -> None:
        """Fail, listing the valid names, unless `name` is one (a check before any work)."""
        if name not in self:
            self.__missing__(name)


class Check(NamedTuple):
    """A valid range of a numeric flag: the test and how the error message states it."""
    ok: Callable[[float], bool]
    says: str


POSITIVE = Check(lambda v: v > 0, "> 0")
NON_NEGATIVE = Check(lambda v: v >= 0, ">= 0")


_INTERRUPTED: list[int] = []  # the signals received: Python drops a KeyboardInterrupt raised inside a __del__


def interrupted(signum: int) -> None:
    """Record a Ctrl-C or SIGTERM (stages.main_guard's handler), then stop where it arrived."""
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def clear_interrupt() -> None:
    _INTERRUPTED.clear()


def defer_interrupts() -> None:
    """A runner's first line: a Ctrl-C or SIGTERM that arrives while torch and transformers import is
    recorded, not raised (raised inside a C extension's import it could abort the process), and the
    run ends at stages.main_guard with one line and exit 130 before any work. FLAT_READY_FILE, when set,
    is created once the signals are deferred (a test waits for it instead of guessing a delay)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: _INTERRUPTED.append(signum))
    if os.environ.get("FLAT_READY_FILE"):
        Path(os.environ["FLAT_READY_FILE"]).touch()


def interrupted_so_far() -> bool:
    """Whether a signal was recorded (deferred during the imports, or swallowed by a library)."""
    return bool(_INTERRUPTED)


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C or SIGTERM arrived and was swallowed on its way (the training
    and evaluation loops call this once per batch)."""
    if _INTERRUPTED:
        raise KeyboardInterrupt
