"""Canonical source names: one spelling per source for quarantine, takedown and binding checks.

A producer must not dodge a quarantine (or frame another source) with a look-alike of a name:
``canonical_source`` applies NFKC, removes invisible format characters (zero-width spaces and
joiners, soft hyphens, bidi marks: Unicode category Cf), case-folds, and folds common Cyrillic and
Greek homoglyphs of Latin letters to the Latin letter (a small skeleton map in the spirit of
Unicode TR39's confusables; not the full table).
"""

from __future__ import annotations

import functools
import unicodedata

__all__ = ["canonical_source"]

#: Lowercase Cyrillic/Greek letters that render like a Latin letter (applied after casefold).
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k", "ӏ": "l",
    "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "ԝ": "w",
    "х": "x", "ԁ": "d", "ɡ": "g", "ү": "y",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j",
    # Latin look-alikes
    "ı": "i", "ȷ": "j", "ℓ": "l",
})


@functools.lru_cache(maxsize=65536)
def canonical_source(name: str) -> str:
    """The canonical form of a source name (see the module docstring); idempotent."""
    s = unicodedata.normalize("NFKC", name)
    s = "".join(ch for ch in s if unicodedata.category(ch) != "Cf")
    s = s.casefold().translate(_CONFUSABLES)
    return unicodedata.normalize("NFKC", s).strip()

