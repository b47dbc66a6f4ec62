"""Toxicity filter with a pluggable scorer: a lexicon file by default, any ``module:factory`` otherwise."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from beam_jobs.filters.base import FilterResult
from beam_jobs.records import Doc

__all__ = ["DEFAULT_LEXICON", "LexiconScorer", "ToxicityFilter"]

DEFAULT_LEXICON = str(Path(__file__).resolve().parent.parent / "assets" / "toxicity_lexicon_en.txt")
_TOKEN = re.compile(r"[a-z']+")


class LexiconScorer:
    """Score = lexicon hits per word (single words and multi-word phrases)."""

    def __init__(self, path: str = DEFAULT_LEXICON):
        terms = [ln.strip().lower() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
        terms = [t for t in terms if t and not t.startswith("#")]
        if not terms:
            raise ValueError(f"toxicity lexicon {path} has no terms")
        self.words = frozenset(t for t in terms if " " not in t)
        self.phrases = tuple(t for t in terms if " " in t)

    def __call__(self, text: str) -> float:
        lower = text.lower()
        tokens = _TOKEN.findall(lower)
        if not tokens:
            return 0.0
        hits = sum(t in self.words for t in tokens) + sum(lower.count(p) for p in self.phrases)
        return hits / len(tokens)


def _load_scorer(spec: str, lexicon: str) -> Callable[[str], float]:
    if spec == "lexicon":
        return LexiconScorer(lexicon)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"toxicity scorer must be 'lexicon' or 'module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory()


class ToxicityFilter:
    """Drops documents whose toxicity score exceeds ``threshold``; the score lands in lineage."""

    name = "toxicity"

    @dataclass(kw_only=True, slots=True)
    class Config:
        scorer: str = "lexicon"  # or "package.module:factory" returning a callable text -> score
        lexicon: str = DEFAULT_LEXICON
        threshold: float = 0.02

        def build(self) -> ToxicityFilter:
            return ToxicityFilter(self)

    def __init__(self, config: ToxicityFilter.Config | None = None):
        self.config = config or ToxicityFilter.Config()
        self._score: Callable[[str], float] | None = None

    def setup(self) -> None:
        if self._score is None:
            self._score = _load_scorer(self.config.scorer, self.config.lexicon)

    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        self.config, self._score = state["config"], None

    def filter(self, doc: Doc) -> FilterResult:
        self.setup()
        score = float(self._score(doc.text))
        doc.lineage["toxicity"] = round(score, 4)
        if score > self.config.threshold:
            return False, "toxic"
        return True
