"""The errors a user sees: each one line that names the fix.

Every check on user input (config, data files, mesh shapes) raises `UserError`; the CLI prints it as
``error: <message>`` and exits with status 2, before anything is compiled or written. A run that stops
itself on a NaN or Inf loss raises `TrainingStopped` (status 3), a signal `Interrupted` (130, 143), a
failed write `WriteFailed` (1). `warn` prints a one-line ``warning: ...``.
"""

import contextlib
import os
import sys
import tempfile


class OneLineError(Exception):
    """An error whose message is one line, printed as ``error: ...``; the CLI exits with ``exit_code``."""

    exit_code = 1
    prefix = "error"  # the word the CLI prints before the message

    def __init__(self, message: str):
        if "\n" in message:
            raise AssertionError(f"{type(self).__name__} messages are one line, got: {message!r}")
        super().__init__(message)


class UserError(OneLineError, ValueError):
    """Bad input from the user: a config value, a data file, a device request. One line, names the fix."""

    exit_code = 2


class TrainingStopped(OneLineError, RuntimeError):
    """The run stopped itself: a NaN or Inf loss. One line naming the step, the last good checkpoint
    and the fix; the CLI exits with status 3."""

    exit_code = 3


class Interrupted(OneLineError, RuntimeError):
    """SIGINT or SIGTERM: the run saved a checkpoint at the step it reached (when it has a workdir) and
    stopped. The CLI exits with 128 + the signal's number (130, 143), as a shell does."""

    prefix = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class WriteFailed(OneLineError, OSError):
    """The disk is full or a write failed: one line naming the path and what is still intact."""

    exit_code = 1


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment: a failed tensorstore read leaves callbacks that print
    tracebacks from its own threads ("Event loop is closed"), which no Python handler sees."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def mute_stderr() -> None:
    """Send everything written to stderr from now on to /dev/null: after a failed write has been
    reported in one line, orbax's and asyncio's leftover tasks print tracebacks as the process exits."""
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def warn(message: str) -> None:
    """Tell the user something worth knowing that is not an error, on one line of stderr."""
    if "\n" in message:
        raise AssertionError(f"warnings are one line, got: {message!r}")
    print(f"warning: {message}", file=sys.stderr, flush=True)


def one_line(text: object, limit: int = 300) -> str:
    """``text`` (often a library's exception message) squeezed into one line of at most ``limit``
    characters, for quoting inside a `UserError`: its whitespace runs, newlines included, become one
    space."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
