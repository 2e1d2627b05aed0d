"""How every tool reports a user error: one line ``error: <file>: <what>; <fix>`` on stderr, exit 2.

A bad input (a missing file, a wrong field, a full disk) is the user's to fix, so a Python
traceback only hides the line that says how; ``--debug`` (or ELLAMA_DEBUG=1) shows it again. An
error of ours (any other exception) keeps its traceback and exits 1.

    if __name__ == "__main__":
        sys.exit(run_tool(main))
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence

USER_ERROR = 2
DEBUG_FLAG = "--debug"

# Failures of the machine the user can fix (space, permissions), reported as one line.
_USER_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class UserError(Exception):
    """Bad input, already phrased as ``<file>: <what>; <fix>``."""


def error_line(e: BaseException) -> str:
    """The one stderr line for a user error."""
    if isinstance(e, OSError) and e.errno in _USER_OS_ERRORS:
        where = e.filename or "output"
        return f"error: {where}: {_USER_OS_ERRORS[e.errno]}; free space or choose a writable location, then rerun"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"error: {e.filename}: {e.strerror.lower()}; check the path"
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = text.strip() or type(e).__name__
    return text if text.startswith("error: ") else f"error: {text}"


def is_user_error(e: BaseException) -> bool:
    """Errors our code raises for bad input (the project's readers raise ValueError subclasses
    naming file and field) and the OS errors a user fixes."""
    if isinstance(e, (UserError, ValueError, KeyError)):
        return True
    if isinstance(e, OSError):
        return e.errno in _USER_OS_ERRORS or isinstance(
            e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)
        )
    return False


def run_tool(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn user errors into the one-line convention.

    ``sys.exit("message")`` inside a tool is a user error too (exit 2, message on stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("ELLAMA_DEBUG") == "1"
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return int(main(argv) or 0)
    except SystemExit as e:
        if e.code in (None, 0) and ("-h" in argv or "--help" in argv):
            print(f"\n{DEBUG_FLAG} (any tool): on an error, show the Python traceback too")
        if isinstance(e.code, str):
            print(error_line(Exception(e.code)), file=sys.stderr)
            return USER_ERROR
        return 0 if e.code is None else int(e.code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        if debug or not is_user_error(e):
            raise
        print(error_line(e), file=sys.stderr)
        return USER_ERROR
