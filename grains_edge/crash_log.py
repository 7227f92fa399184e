"""An unexpected exception: one line on stderr, the full traceback in a log file."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from grains_edge import paths

EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h)


def write_log(error: BaseException) -> Path | None:
    """Write the traceback under the user data folder's logs/ (or the temp folder when that is not
    writable); None when neither is."""
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"grains-edge {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(error))
    for folder in (paths.home() / "logs", Path(tempfile.gettempdir()) / "grains-edge-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        except OSError:
            continue
        return folder / name
    return None


def report(error: BaseException) -> int:
    """Print the one line for an unexpected `error`, log its traceback, and return the exit code."""
    message = next(iter(str(error).splitlines()), "")[:300]
    log = write_log(error)
    where = f"full traceback in {log}" if log else "no log folder was writable for the traceback"
    print(f"grains-edge: internal error: {type(error).__name__}: {message}; {where}", file=sys.stderr)
    return EXIT_INTERNAL_ERROR
