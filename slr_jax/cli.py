"""The exit contract of every command-line entry point, in one place.

    python -m slr_jax.<tool> ...  ->  0 done | 1 user error | 2 bad flags | 75 preempted
                                      130 interrupted (Ctrl-C before anything could be saved)

A user's mistake or a broken input ends in ONE ``error: ...`` line on stderr (``SLR_JAX_DEBUG=1``
shows the traceback instead); anything else is a bug and keeps its traceback. Entry points call
:func:`run_cli` with their ``main`` and build argparse parsers with :class:`ArgumentParser`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

from slr_jax.errors import SlrJaxError, StorageError

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_BAD_FLAGS = 2
# A run stopped by SIGTERM or Ctrl-C after saving: EX_TEMPFAIL, "try again", so that a scheduler
# can tell it from a finished run (0) and from a failure (1).
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the shell's convention for Ctrl-C
DEBUG_ENV = "SLR_JAX_DEBUG"
# Storage failures a user fixes (space, permissions, a read-only mount), not bugs.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad flag reported as one ``error:`` line (exit status 2), no usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_FLAGS)


def free_space(folder: str) -> str:
    """'1.2 GiB free' on the file system of ``folder`` (or its nearest existing parent)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    raise AssertionError("unreachable")


# TensorStore reports a failed write as ValueError("... [os_error_code='28']").
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _as_storage_error(item: BaseException) -> OSError | None:
    if isinstance(item, OSError) and item.errno in STORAGE_ERRNOS:
        return item
    text = str(item)
    codes = [int(c) for c in _OS_ERROR_CODE.findall(text)]
    codes += [code for code in STORAGE_ERRNOS if os.strerror(code) in text]
    code = next((c for c in codes if c in STORAGE_ERRNOS), None)
    if code is None:
        return None
    return OSError(code, os.strerror(code), _folder_in(text))


def _folder_in(text: str) -> str | None:
    """The folder a TensorStore message names: its first quoted absolute path, cut above the
    temporary folder of the save (``N.orbax-checkpoint-tmp``)."""
    found = re.search(r'"((?:/|gs://)[^"]+)"', text)
    if not found:
        return None
    parts = found.group(1).split("/")
    tmp = next((i for i, p in enumerate(parts) if "orbax-checkpoint-tmp" in p), len(parts))
    return "/".join(parts[: tmp + 1]) if tmp < len(parts) else found.group(1)


def storage_cause(error: BaseException) -> OSError | None:
    """The disk-full / permission failure inside ``error`` (its causes, contexts and exception
    groups: Orbax re-raises background-thread failures wrapped, TensorStore's as text), as an
    OSError; None when there is none."""
    seen, todo = set(), [error]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        found = _as_storage_error(item)
        if found is not None:
            return found
        todo += [item.__cause__, item.__context__, *getattr(item, "exceptions", ())]
    return None


def storage_error(error: OSError, folder: str | None = None) -> StorageError:
    """One actionable line for a failed write: the folder, the reason and the free space."""
    where = folder or os.path.dirname(os.fspath(error.filename or "")) or "."
    reason = os.strerror(error.errno) if error.errno else str(error)
    return StorageError(
        f"cannot write to {where} ({reason}; {free_space(where)}): free space or fix the "
        "permissions there, or choose another folder."
    )


def describe(error: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an error caused by the user or the machine, None for a bug."""
    if isinstance(error, SlrJaxError):
        return error.exit_code, str(error)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C)."
    cause = storage_cause(error)
    if cause is not None:
        return EXIT_USER_ERROR, str(storage_error(cause))
    return None


class _OneLineOnTerminal(logging.Filter):
    """Library log records that carry a traceback (Orbax's background save threads, asyncio)
    reach the terminal as their first line; the traceback goes to the log file only."""

    log_file: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text or record.stack_info:
            lines = record.getMessage().strip().splitlines() or [""]
            where = self.log_file or f"none kept: rerun with {DEBUG_ENV}=1 to see it"
            record.msg, record.args = f"{lines[0][:300]} (traceback: {where})", ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


_TERMINAL_FILTER = _OneLineOnTerminal()


def _terminal_handlers() -> list[logging.Handler]:
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]
    return [*handlers, logging.lastResort] if logging.lastResort else handlers


def keep_tracebacks_off_the_terminal() -> None:
    """Installs the filter of :class:`_OneLineOnTerminal` on the terminal's log handlers, and
    routes uncaught exceptions of background threads through logging."""
    for handler in _terminal_handlers():
        if _TERMINAL_FILTER not in handler.filters:
            handler.addFilter(_TERMINAL_FILTER)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        logging.getLogger("slr_jax").error(
            "thread %s failed", getattr(args.thread, "name", "?"),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )  # fmt: skip

    threading.excepthook = thread_hook

    # Native threads (TensorStore's, whose callbacks call into asyncio) report a Python
    # exception with PyErr_Print, i.e. through sys.excepthook, outside any Python thread:
    # log those too. The main thread's own uncaught exceptions keep the default hook.
    default_hook = sys.__excepthook__

    def excepthook(exc_type, exc_value, exc_traceback) -> None:
        if threading.current_thread() is threading.main_thread():
            default_hook(exc_type, exc_value, exc_traceback)
            return
        logging.getLogger("slr_jax").error(
            "background error: %s", exc_value, exc_info=(exc_type, exc_value, exc_traceback)
        )

    def unraisable_hook(unraisable) -> None:
        logging.getLogger("slr_jax").error(
            "%s: %r", unraisable.err_msg or "exception ignored", unraisable.object,
            exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
        )  # fmt: skip

    sys.excepthook = excepthook
    sys.unraisablehook = unraisable_hook


def log_to_file(path: str) -> str:
    """Every log record from now on, tracebacks included, also goes to ``path`` (appended);
    the terminal keeps one line per record. Returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers.insert(0, handler)  # before the terminal's filter shortens the record
    _TERMINAL_FILTER.log_file = path
    keep_tracebacks_off_the_terminal()
    return path


def run_cli(main: Callable[[], int | None], *, debug: bool = False) -> NoReturn:
    """Runs ``main()`` and exits with its status; a user error (see :func:`describe`) becomes one
    ``error:`` line on stderr and its exit status. ``debug`` (or ``$SLR_JAX_DEBUG``) re-raises."""
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if not debug:
        keep_tracebacks_off_the_terminal()
    try:
        status = main()
    except SystemExit:
        raise
    except BaseException as error:
        described = None if debug else describe(error)
        if described is None:
            raise
        status, message = described
        _flush_logs()
        print(f"error: {message}", file=sys.stderr)
        _quiet_shutdown()
    sys.exit(status or EXIT_OK)


def _quiet_shutdown() -> None:
    """After the ``error:`` line: what libraries print while the interpreter shuts down (Orbax's
    and asyncio's background threads failing on a closed event loop after a failed save) goes
    to the log file (or nowhere), so the error line stays the last word on the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    target = _TERMINAL_FILTER.log_file or os.devnull
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:  # the log's disk may be the full one
        fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, sys.stderr.fileno())
    os.close(fd)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
