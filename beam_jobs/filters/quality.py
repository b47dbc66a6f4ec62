"""Gopher- and C4-style quality heuristics (after datatrove's filters of the same names)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from beam_jobs.filters.base import FilterResult
from beam_jobs.records import Doc

__all__ = ["C4QualityFilter", "GopherQualityFilter", "GopherRepetitionFilter"]

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_PUNCT_STRIP = ".,;:!?\"'()[]{}<>«»“”‘’-–—*"
_STOP_WORDS = frozenset(
    ["the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it", "for", "on", "as", "at", "by", "this", "from", "or", "an", "are", "was", "were", "de", "la", "le", "et", "des", "les", "und", "der", "die", "das", "en", "el", "los", "y", "que"]
)
_BULLETS = ("•", "●", "○", "■", "□", "▪", "-", "*", "–", "‣", "⁃")
_ELLIPSIS = ("...", "…")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


class GopherQualityFilter:
    """Word counts, mean word length, symbol/bullet/ellipsis ratios, alphabetic words, stop words."""

    name = "gopher_quality"

    @dataclass(kw_only=True, slots=True)
    class Config:
        min_doc_words: int = 50
        max_doc_words: int = 100_000
        min_avg_word_length: float = 3.0
        max_avg_word_length: float = 10.0
        max_symbol_word_ratio: float = 0.1
        max_bullet_lines_ratio: float = 0.9
        max_ellipsis_lines_ratio: float = 0.3
        min_alpha_words_ratio: float = 0.8
        min_stop_words: int = 2

        def build(self) -> GopherQualityFilter:
            return GopherQualityFilter(self)

    def __init__(self, config: GopherQualityFilter.Config | None = None):
        self.config = config or GopherQualityFilter.Config()

    def filter(self, doc: Doc) -> FilterResult:
        c = self.config
        words = _words(doc.text)
        n = len(words)
        if n < c.min_doc_words:
            return False, "too_few_words"
        if n > c.max_doc_words:
            return False, "too_many_words"
        stripped = [w.strip(_PUNCT_STRIP) for w in words]
        stripped = [w for w in stripped if w] or [""]
        avg = sum(map(len, stripped)) / len(stripped)
        if avg < c.min_avg_word_length:
            return False, "short_words"
        if avg > c.max_avg_word_length:
            return False, "long_words"
        symbols = doc.text.count("#") + sum(doc.text.count(e) for e in _ELLIPSIS)
        if symbols / n > c.max_symbol_word_ratio:
            return False, "symbol_ratio"
        lines = [ln.strip() for ln in doc.text.splitlines() if ln.strip()]
        if lines and sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > c.max_bullet_lines_ratio:
            return False, "bullet_lines"
        if lines and sum(ln.endswith(_ELLIPSIS) for ln in lines) / len(lines) > c.max_ellipsis_lines_ratio:
            return False, "ellipsis_lines"
        if sum(bool(_ALPHA.search(w)) for w in words) / n < c.min_alpha_words_ratio:
            return False, "non_alpha_words"
        if sum(w.lower() in _STOP_WORDS for w in stripped) < c.min_stop_words:
            return False, "few_stop_words"
        return True


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of chars in them)."""
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        seen.add(it)
    return (dup_n / len(items) if items else 0.0, dup_chars / total_chars if total_chars else 0.0)


class GopherRepetitionFilter:
    """Repeated lines/paragraphs, top n-gram share and duplicated n-gram share (Gopher Table A1)."""

    name = "gopher_repetition"

    @dataclass(kw_only=True, slots=True)
    class Config:
        dup_line_frac: float = 0.3
        dup_para_frac: float = 0.3
        dup_line_char_frac: float = 0.2
        dup_para_char_frac: float = 0.2
        top_n_grams: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
        dup_n_grams: dict[int, float] = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

        def build(self) -> GopherRepetitionFilter:
            return GopherRepetitionFilter(self)

    def __init__(self, config: GopherRepetitionFilter.Config | None = None):
        self.config = config or GopherRepetitionFilter.Config()

    def filter(self, doc: Doc) -> FilterResult:
        c = self.config
        paras = [p.strip() for p in re.split(r"\n{2,}", doc.text) if p.strip()]
        frac, char_frac = _dup_fraction(paras)
        if frac > c.dup_para_frac:
            return False, "dup_para_frac"
        if char_frac > c.dup_para_char_frac:
            return False, "dup_para_char_frac"
        lines = [ln.strip() for ln in doc.text.splitlines() if ln.strip()]
        frac, char_frac = _dup_fraction(lines)
        if frac > c.dup_line_frac:
            return False, "dup_line_frac"
        if char_frac > c.dup_line_char_frac:
            return False, "dup_line_char_frac"
        words = [w.lower() for w in _words(doc.text)]
        total_chars = sum(map(len, words)) or 1
        for n, limit in c.top_n_grams.items():
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            if grams:
                gram, count = grams.most_common(1)[0]
                if count > 1 and count * sum(map(len, gram)) / total_chars > limit:
                    return False, f"top_{n}_gram"
        for n, limit in c.dup_n_grams.items():
            if len(words) < n:
                continue
            seen: set[tuple[str, ...]] = set()
            covered = [False] * len(words)
            for i in range(len(words) - n + 1):
                gram = tuple(words[i : i + n])
                if gram in seen:
                    for j in range(i, i + n):
                        covered[j] = True
                seen.add(gram)
            dup_chars = sum(len(w) for w, cov in zip(words, covered) if cov)
            if dup_chars / total_chars > limit:
                return False, f"dup_{n}_gram"
        return True


_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "»")


class C4QualityFilter:
    """Keeps only lines ending in terminal punctuation, removes boilerplate; drops lorem ipsum / code."""

    name = "c4_quality"

    @dataclass(kw_only=True, slots=True)
    class Config:
        min_sentences: int = 3
        min_words_per_line: int = 3
        max_word_length: int = 1000
        drop_curly_bracket: bool = True
        drop_lorem_ipsum: bool = True

        def build(self) -> C4QualityFilter:
            return C4QualityFilter(self)

    def __init__(self, config: C4QualityFilter.Config | None = None):
        self.config = config or C4QualityFilter.Config()

    def filter(self, doc: Doc) -> FilterResult:
        c = self.config
        lower = doc.text.lower()
        if c.drop_lorem_ipsum and "lorem ipsum" in lower:
            return False, "lorem_ipsum"
        if c.drop_curly_bracket and "{" in doc.text:
            return False, "curly_bracket"
        kept: list[str] = []
        sentences = 0
        for line in doc.text.splitlines():
            s = line.strip()
            if not s:
                if kept and kept[-1]:
                    kept.append("")
                continue
            low = s.lower()
            if not s.endswith(_TERMINAL) or s.endswith("..."):
                continue
            if len(s.split()) < c.min_words_per_line:
                continue
            if "javascript" in low or any(p in low for p in _POLICY):
                continue
            if max(map(len, s.split())) > c.max_word_length:
                continue
            sentences += len(re.findall(r"[.!?]+(?:\s|$)", s)) or 1
            kept.append(s)
        if sentences < c.min_sentences:
            return False, "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return True
