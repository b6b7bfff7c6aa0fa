"""Write errors: a full disk, a failing disk or a full sqlite database, wherever they surface.

A sweep writes in three places: its trials' checkpoints (on the workers), MLflow (the tracking
store and its artifacts) and the Optuna studies (sqlite by default). When any of them cannot be
written the sweep stops at once with one message and exit code 1 (:func:`orchestrator.launch.exit_code`),
and nothing is recorded as done that is not: an Optuna trial is told COMPLETE only once its MLflow
run is FINISHED, so a trial cut short stays RUNNING in Optuna and the same command run again, once
space is freed, resumes it from its last checkpoint in its own run.
"""

from __future__ import annotations

import errno
import re

WRITE_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS}
# The same failures as text: a trial's error arrives at the driver as a formatted traceback, and
# MLflow and Optuna wrap sqlite's error in their own exceptions.
WRITE_ERROR_TEXT = re.compile(
    r"No space left on device|database or disk is full|Disk quota exceeded|Read-only file system"
    r"|Input/output error|disk I/O error|\[Errno (?:%s)\]" % "|".join(str(n) for n in sorted(WRITE_ERRNOS))
)


class WriteError(RuntimeError):
    """A write a sweep needs failed (disk full, I/O error): the sweep stops and can be resumed."""


def write_problem(err: BaseException | str | None) -> str | None:
    """The line naming the write failure in ``err`` (an exception, its causes and contexts, or an
    error text such as a trial's traceback); None when it is not a write failure."""
    seen: set[int] = set()
    while isinstance(err, BaseException) and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, WriteError):
            return str(err)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return f"{type(err).__name__}: {err}"
        match = WRITE_ERROR_TEXT.search(str(err))
        if match:
            return _line_of(str(err), match)
        err = err.__cause__ or err.__context__
    if isinstance(err, str):
        match = WRITE_ERROR_TEXT.search(err)
        return _line_of(err, match) if match else None
    return None


def _line_of(text: str, match: re.Match) -> str:
    """The line of ``text`` holding ``match`` (the last such line of a traceback), shortened."""
    lines = [line.strip() for line in text.splitlines() if WRITE_ERROR_TEXT.search(line)]
    line = lines[-1] if lines else match.group(0)
    return re.sub(r"^[\w.]*WriteError: ", "", line)[:300]  # the driver's wrapper, seen in a traceback


def write_error_message(problem: str) -> str:
    """The one message a sweep stopped by a write failure ends with."""
    return (
        f"a write failed: {problem}\n"
        "The sweep stopped; no unfinished trial was recorded as done. Free space (or fix the disk) and run the "
        "same command again: finished trials are kept, the others resume from their last checkpoints."
    )


# Loggers that print a full traceback for a write failure the sweep's own message already names.
NOISY_LOGGERS = ("ray.tune.execution.tune_controller", "mlflow.store.db.utils", "optuna.storages._rdb.storage")


class _WriteErrorFilter:
    """Drops a log record that carries a write failure: the sweep ends with one message for it."""

    def filter(self, record) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return write_problem(err) is None if err is not None else True


def quiet_write_errors() -> None:
    """No library traceback for a write failure (MLflow logs sqlite's error before raising it, Tune
    logs the trial it could not stop): the driver's one message says what failed and what to do."""
    import logging

    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WriteErrorFilter) for f in logger.filters):
            logger.addFilter(_WriteErrorFilter())
