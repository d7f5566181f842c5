"""Small helpers shared by test modules."""

from __future__ import annotations

import re


def plain(text: str) -> str:
    """CLI output without rich's boxes and line breaks."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)
