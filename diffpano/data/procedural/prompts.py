"""What a prompt says about the room it asks for, in the procedural generator's words: room type, wall colour, floor
(the adherence metric reads prompts with it, and `generate --layout` lays a house out by it)."""

from __future__ import annotations

import re

from diffpano.data.procedural.materials import WALL_COLOURS
from diffpano.data.procedural.scenes import ROOM_TYPES

COLOURS = tuple(WALL_COLOURS)

_SPELLINGS = {"grey": "gray", "livingroom": "living room"}
_ROOM_WORDS = {**{t: t for t in ROOM_TYPES}, "corridor": "hallway", "lounge": "living room"}
_ROOM_RE = r"(?:" + "|".join(sorted((w.replace(" ", r"[\s-]+") for w in _ROOM_WORDS), key=len, reverse=True)) + r")"
_COLOUR_RE = r"(?P<c>" + "|".join([*COLOURS, "grey"]) + r")"
_ADJ_RE = (r"(?:(?:cozy|cosy|bright|quiet|modern|small|large|big|little|spacious|empty|tidy|simple|sunny|dark|light)"
           r"\s+)?")
# Wall-colour phrasings, strongest first: a colour bound to the word wall(s), then "painted <colour>".
_TONE_RE = r"(?:(?:a|an)\s+)?(?:(?:light|dark|pale|deep|bright|soft|warm)\s+)?"
_WALL_PATTERNS = [
    re.compile(rf"\b{_COLOUR_RE}(?:[\s-]+(?:painted|coloured|colored|tinted))?[\s-]+wall(?:s|ed)?\b"),
    re.compile(rf"\bwalls?\s+(?:of\s+(?:the|this|that|a|an)\s+(?:\w+\s+)?{_ROOM_RE}\s+)?(?:are\s+|is\s+)?(?:all\s+)?"
               rf"(?:painted\s+)?(?:in\s+)?{_TONE_RE}{_COLOUR_RE}\b"),
    # "painted <colour>" only of the room or its walls: "a bed painted white" says nothing about the walls.
    re.compile(rf"(?:^|\b(?:{_ROOM_RE}|room|walls?|it|which|that)\s*,?\s+(?:(?:is|are|was|were|has been|have been)\s+)?"
               rf"(?:all\s+|fully\s+|freshly\s+)?)painted\s+(?:in\s+)?{_TONE_RE}{_COLOUR_RE}\b"),
]
# A room type named as somewhere else ("a doorway leads to the kitchen") is not the room shown.
_ELSEWHERE = re.compile(r"\b(?:to|into|onto|towards?|from|beside|near)\s+(?:(?:the|a|an)\s+)?(?:\w+\s+)?$")


def _normalise(text: str) -> str:
    """Lower case, one space between words, other spellings mapped to the dataset's words."""
    text = re.sub(r"\s+", " ", text.lower())
    return re.sub(r"\b(grey|livingroom)\b", lambda m: _SPELLINGS[m.group(1)], text)


def _room_mentions(text: str) -> list[tuple[int, int, str]]:
    """(start, end, room type) of each room-type word in the prompt that names the room shown."""
    out = []
    for m in re.finditer(rf"\b(?P<r>{_ROOM_RE})s?\b", text):
        if not _ELSEWHERE.search(text[: m.start()]):
            out.append((m.start(), m.end(), _ROOM_WORDS[re.sub(r"[\s-]+", " ", m.group("r"))]))
    return out


def parse_prompt(text: str) -> tuple[str | None, str | None]:
    """(room type, wall colour) a prompt asks for; None for what it does not state."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a prompt string, got {type(text).__name__}")
    text = _normalise(text)
    mentions = _room_mentions(text)
    room = mentions[0][2] if mentions else None
    for pattern in _WALL_PATTERNS:
        m = pattern.search(text)
        if m:
            return room, m.group("c")
    # "a blue bedroom": a colour right before the room shown (an adjective may sit between).
    for start, _, kind in mentions:
        m = re.search(rf"\b{_COLOUR_RE}\s+{_ADJ_RE}$", text[:start])
        if m and kind == room:
            return room, m.group("c")
    return room, None


# How prompts name the floors (the longest names first: "dark wood" before "wood").
FLOOR_WORDS = {"dark wood": r"dark wood(en)?", "beige carpet": r"beige carpet", "gray tile": r"gr[ae]y til(e|ed)",
               "wood": r"wood(en)? floor|parquet|floorboards", "carpet": r"carpet", "tile": r"til(e|ed)",
               "stone": r"stone floor|marble"}


def floor_named(text: str) -> str | None:
    """The floor (a key of FLOORS) a text names, or None."""
    lowered = text.lower()
    return next((floor for floor, words in FLOOR_WORDS.items() if re.search(rf"\b(?:{words})\b", lowered)), None)
