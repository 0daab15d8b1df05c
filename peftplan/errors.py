"""The one error type the planner raises for bad input, its kinds, and how user text is quoted in messages.

The CLI turns a `PlanError` into one line on stderr and exit code 2; nothing else in the
package prints or exits. The subclasses name the kind of bad input (all are `PlanError`, so
`except PlanError` catches every one); their messages are the same the CLI prints.
"""
from __future__ import annotations

import difflib

QUOTE_MAX = 60  # characters of a user's value echoed in a message


class PlanError(ValueError):
    """Bad input: the message is one line that names the problem."""


class PlanValueError(PlanError):
    """A Plan field or command option of the wrong type, non-finite, or outside its range."""


class ConfigError(PlanError):
    """A config.json / model-card field of the wrong type or value, or an impossible architecture."""


class InputFileError(PlanError):
    """A file or folder that cannot be read (missing, no permission, a name too long, not text, a FIFO)."""


class WorkTooLargeError(PlanError):
    """Accepted input whose work (grid points, traced ops) is past a documented bound; `--yes` overrides."""


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """A user's value for a one-line message: `repr`-quoted strings (no raw newline or escape reaches the
    terminal), cut to `limit` characters with the length of what was cut."""
    text = repr(value) if isinstance(value, str) else repr(value) if not isinstance(value, (int, float)) else str(value)
    if isinstance(value, int) and not isinstance(value, bool) and len(text) > 30:
        text = f"{text[:12]}…({len(text)} digits)"
    if len(text) > limit:
        text = f"{text[:limit]}…<{len(text) - limit} more>"
    return text


def suggest(name: str, choices: list[str] | tuple[str, ...], what: str) -> PlanError:
    """A `PlanError` for an unknown name, with the closest known names as a hint."""
    close = difflib.get_close_matches(name.lower()[:200], [c.lower() for c in choices], n=3, cutoff=0.5)
    by_lower = {c.lower(): c for c in choices}
    hint = f"; did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
    return PlanError(f"unknown {what} {quote(name)}{hint} (see `peftplan {what}s`)")
