"""The streamconv error family.

Every error a user can cause is a :class:`StreamconvError` whose message is one line of the form
``<tensor or file>: <what> (expected X, got Y). <fix>``.  Validation collects every problem and raises
once (see :class:`ValidationError`), before anything is written.
"""

from __future__ import annotations


class StreamconvError(Exception):
    """Base class of every error streamconv raises on purpose."""


class SourceError(StreamconvError):
    """A source checkpoint is missing, truncated, corrupt or not what its config says."""


class FormatError(SourceError):
    """A file's bytes do not follow the format it claims (bad header, offsets outside the file, ...)."""


class PlanError(StreamconvError):
    """A plan file is malformed, stale, or was written by an incompatible version."""


class GraphError(StreamconvError):
    """A graph node is ill-typed: wrong source count, shapes that do not fit, an unknown op."""


class ExecutionError(StreamconvError):
    """Running a plan failed (write error, disk full, a source changed under us)."""


class ValidationError(StreamconvError):
    """One or more problems found before any side effect; ``problems`` holds one line each."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            shown = self.problems[:20]
            more = len(self.problems) - len(shown)
            message = f"{len(self.problems)} problems:\n  " + "\n  ".join(shown)
            if more:
                message += f"\n  ... and {more} more"
        super().__init__(message)
