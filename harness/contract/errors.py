"""The one error a user can act on, and the words that help them."""

from __future__ import annotations

import difflib


class UsageError(Exception):
    """Bad input from the user (unknown model, unreadable config, bad file): the CLI exits 2."""


def did_you_mean(name: str, known: list[str]) -> str:
    """' Did you mean a, b?' for near misses (a typo, or a prefix such as gemma-3-4b), else ''."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    close += [k for k in known if k.lower().startswith(name.lower()) and k not in close][: max(0, 3 - len(close))]
    return f" Did you mean {', '.join(close)}?" if close else ""
