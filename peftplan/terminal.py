"""What the CLI writes to a terminal besides data: the one-line error, and the fallbacks for terminals that
cannot take what rich writes (an encoding other than UTF-8, a full or closed stdout)."""
from __future__ import annotations

import codecs
import os
import sys

MAX_ERROR_CHARS = 1000


def error_line(message: str) -> str:
    """One printable line: control characters (newlines, ESC) shown escaped, cut to MAX_ERROR_CHARS."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message).strip())
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"…<{len(text) - MAX_ERROR_CHARS} more>"
    return f"peftplan: error: {text}"


# what the ASCII fallback writes for the few non-ASCII symbols the tables use (anything else becomes '?')
ASCII = {"·": "-", "★": "*", "→": "->", "✗": "x", "≥": ">=", "≤": "<=", "×": "x", "α": "alpha", "—": "-",
         "−": "-", "…": "...", "±": "+-", "│": "|", "─": "-", "━": "-", "┃": "|", "╭": "+", "╮": "+", "╰": "+",
         "╯": "+"}


def _ascii_replace(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeEncodeError):
        raise err
    bad = err.object[err.start:err.end]
    return "".join(ASCII.get(c, "?") for c in bad), err.end


codecs.register_error("peftplan-ascii", _ascii_replace)


def ascii_fallback() -> None:
    """On stdout/stderr whose encoding is not UTF-8 (PYTHONIOENCODING=ascii, latin-1), write ASCII for the
    symbols the output uses instead of failing with UnicodeEncodeError (rich picks ASCII boxes itself)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding and not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="peftplan-ascii")
            except (OSError, ValueError):
                pass


def silence_stdout() -> None:
    """After a failed write to stdout, point fd 1 at /dev/null so the exit-time flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError:
        pass


PIPED_WIDTH = 160  # columns for tables written to a pipe or file: wide enough that no breakdown table wraps


def wide_when_piped() -> None:
    """rich lays out for 80 columns when stdout is not a terminal; a table piped to a file or `less` then wraps
    its names. Without a terminal and without an explicit COLUMNS, lay out for PIPED_WIDTH instead (rich reads
    COLUMNS when a Console is made)."""
    if "COLUMNS" not in os.environ and not sys.stdout.isatty():
        os.environ["COLUMNS"] = str(PIPED_WIDTH)
