"""The one error type the planner raises for bad input.

The CLI turns a `PlanError` into one line on stderr and exit code 2; nothing else in the
package prints or exits.
"""
from __future__ import annotations

import difflib


class PlanError(ValueError):
    """Bad input: the message is one line that names the problem."""


def suggest(name: str, choices: list[str] | tuple[str, ...], what: str) -> PlanError:
    """A `PlanError` for an unknown name, with the closest known names as a hint."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=3, cutoff=0.5)
    by_lower = {c.lower(): c for c in choices}
    hint = f"; did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
    return PlanError(f"unknown {what} '{name}'{hint} (see `peftplan {what}s`)")
