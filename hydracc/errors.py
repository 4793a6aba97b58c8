"""Errors a user can act on, each with the exit code the CLI gives it.

Design: every failure the user caused (bad path, bad checkpoint, bad plan, an
architecture we cannot handle) is a ``HydraError`` subclass carrying a message that
says what went wrong, where, and how to fix it. The CLI turns these into one line on
stderr and a non-zero exit code; anything else is a bug and gets exit code 1.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
"""``hydracc verify``: the comparison ran and a threshold does not hold."""
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class HydraError(Exception):
    """Base class for errors caused by the user's input; ``exit_code`` is what the CLI returns."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class CheckpointError(HydraError):
    """The input checkpoint is missing, unreadable, truncated or inconsistent with its config."""


class UnsupportedModelError(HydraError):
    """The architecture cannot be captured or its attention sites cannot be converted."""


class PlanError(HydraError):
    """A plan document is malformed or does not fit the model."""


class OutputError(HydraError):
    """The output path cannot be written (exists without --force, not writable, ...)."""


class PassError(HydraError):
    """A graph pass failed or left the graph broken."""


class PaddingNotSupportedError(HydraError):
    """The batch's attention mask is one the hybrid runtime cannot honour (not causal, or right padding in generation)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds (temporary outputs removed) as Ctrl-C does."""
