"""Plain-text help for the project's argparse CLIs.

Module docstrings double as CLI descriptions and use RST literals (````python -m ...````); argparse prints
them verbatim, so every ``--help`` here goes through :func:`plain`.
"""

from __future__ import annotations


def plain(text: str) -> str:
    """``text`` without RST double-backtick literal markup."""
    return text.replace("``", "")


def first_line(doc: str | None) -> str:
    """The docstring's first line as plain text (a parser's one-line description)."""
    return plain((doc or "").strip().split("\n")[0])
