"""Offline language identification with lingua and a confidence threshold."""

from __future__ import annotations

from dataclasses import dataclass, field

from beam_jobs.filters.base import FilterResult
from beam_jobs.records import Doc

__all__ = ["LanguageFilter"]


class LanguageFilter:
    """Sets ``doc.language`` (ISO 639-1); drops low-confidence detections and languages not kept."""

    name = "language"

    @dataclass(kw_only=True, slots=True)
    class Config:
        languages: list[str] = field(default_factory=lambda: ["en", "de", "fr", "es"])  # kept
        candidates: list[str] = field(  # detected among (languages are always included)
            default_factory=lambda: ["en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "zh", "ja", "ar"]
        )
        min_confidence: float = 0.5
        max_chars: int = 2000  # lingua sees a prefix; enough for a stable decision

        def build(self) -> LanguageFilter:
            return LanguageFilter(self)

    def __init__(self, config: LanguageFilter.Config | None = None):
        self.config = config or LanguageFilter.Config()
        self._detector = None

    def setup(self) -> None:
        if self._detector is not None:
            return
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

        try:
            codes = dict.fromkeys([*self.config.languages, *self.config.candidates])
            langs = [Language.from_iso_code_639_1(getattr(IsoCode639_1, c.upper())) for c in codes]
        except AttributeError as e:
            raise ValueError(f"unknown language code in {self.config.languages}: {e}") from None
        if len(langs) < 2:
            raise ValueError("lingua needs at least two candidate languages")
        self._detector = LanguageDetectorBuilder.from_languages(*langs).build()

    def __getstate__(self):
        return {"config": self.config, "_detector": None}

    def __setstate__(self, state):
        self.config, self._detector = state["config"], None

    def filter(self, doc: Doc) -> FilterResult:
        self.setup()
        values = self._detector.compute_language_confidence_values(doc.text[: self.config.max_chars])
        if not values:
            return False, "undetected"
        top = values[0]
        if top.value < self.config.min_confidence:
            return False, "low_confidence"
        language = top.language.iso_code_639_1.name.lower()
        if language not in self.config.languages:
            return False, f"not_allowed_{language}"
        doc.language = language
        doc.lineage["language_confidence"] = round(top.value, 3)
        return True
