"""Text filters (datatrove style: ``filter(doc) -> True | (False, reason)``) and their chain config."""

from __future__ import annotations

from dataclasses import dataclass, field

from beam_jobs.filters.base import FilterStep, TextFilter, run_filters
from beam_jobs.filters.language import LanguageFilter
from beam_jobs.filters.normalize import NormalizeFilter
from beam_jobs.filters.perplexity import PerplexityFilter
from beam_jobs.filters.pii import PIIScrubber
from beam_jobs.filters.quality import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from beam_jobs.filters.toxicity import ToxicityFilter

__all__ = [
    "C4QualityFilter",
    "FilterChain",
    "FilterStep",
    "GopherQualityFilter",
    "GopherRepetitionFilter",
    "LanguageFilter",
    "NormalizeFilter",
    "PIIScrubber",
    "PerplexityFilter",
    "TextFilter",
    "ToxicityFilter",
    "run_filters",
]


class FilterChain:
    """The ordered text filter chain of the ingest job."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        normalize: NormalizeFilter.Config | None = field(default_factory=NormalizeFilter.Config)
        language: LanguageFilter.Config | None = field(default_factory=LanguageFilter.Config)
        c4: C4QualityFilter.Config | None = field(default_factory=C4QualityFilter.Config)
        gopher_quality: GopherQualityFilter.Config | None = field(default_factory=GopherQualityFilter.Config)
        gopher_repetition: GopherRepetitionFilter.Config | None = field(default_factory=GopherRepetitionFilter.Config)
        pii: PIIScrubber.Config | None = field(default_factory=PIIScrubber.Config)
        toxicity: ToxicityFilter.Config | None = field(default_factory=ToxicityFilter.Config)
        perplexity: PerplexityFilter.Config | None = None

        def build(self) -> list[TextFilter]:
            """Filters in order; a ``None`` config disables that step."""
            order = ("normalize", "language", "c4", "gopher_quality", "gopher_repetition", "pii", "toxicity", "perplexity")
            return [cfg.build() for cfg in (getattr(self, n) for n in order) if cfg is not None]
