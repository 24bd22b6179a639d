"""The one exception type users see.

Anything caused by the user's files (config, data, templates) raises `TaskfitError` with a
message that names the file, line or field and says what to do. The CLI prints it and
exits with status 2; it never shows a traceback for these.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TaskfitError(Exception):
    """A problem with the user's input, explained in one paragraph."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest option, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
