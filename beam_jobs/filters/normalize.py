"""Unicode normalisation and mojibake repair (ftfy when installed, a minimal repair otherwise)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from beam_jobs.filters.base import FilterResult
from beam_jobs.records import Doc

__all__ = ["NormalizeFilter"]

try:
    import ftfy
except ImportError:  # pragma: no cover - ftfy is a declared dependency
    ftfy = None

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_MOJIBAKE_HINT = re.compile("[ÃÂâ][\u0080-\u00bf€‚ƒ„…†‡ˆ‰Š‹ŒŽ''""•–—˜™š›œžŸ]")


def _repair_minimal(text: str) -> str:
    """Undo one round of UTF-8-read-as-cp1252/latin-1 when it clearly decodes better."""
    if not _MOJIBAKE_HINT.search(text):
        return text
    for codec in ("cp1252", "latin-1"):
        try:
            fixed = text.encode(codec).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
        return fixed
    return text


class NormalizeFilter:
    """Repairs mojibake, applies NFC, strips control characters; drops docs left empty."""

    name = "normalize"

    @dataclass(kw_only=True, slots=True)
    class Config:
        form: str = "NFC"
        use_ftfy: bool = True

        def build(self) -> NormalizeFilter:
            return NormalizeFilter(self)

    def __init__(self, config: NormalizeFilter.Config | None = None):
        self.config = config or NormalizeFilter.Config()

    def filter(self, doc: Doc) -> FilterResult:
        text = doc.text
        if self.config.use_ftfy and ftfy is not None:
            text = ftfy.fix_text(text, normalization=self.config.form)
        else:
            text = unicodedata.normalize(self.config.form, _repair_minimal(text))
        text = _CONTROL.sub("", text).strip()
        if not text:
            return False, "empty_after_normalize"
        doc.text = text
        return True
