"""User-facing errors of the merge engine."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MergeError(ValueError):
    """A mistake in a recipe or its models; the message names the problem and the way out."""


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest known name, or "" when nothing is close."""
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, value: str, known: Iterable[str]) -> MergeError:
    """The error for a name outside a known set, in the form
    "unknown method 'tie'; did you mean 'ties'? Known: ..."."""
    known = list(known)
    hint = did_you_mean(value, known) or "."
    return MergeError(f"unknown {kind} '{value}'{hint} Known: {', '.join(known)}")
