"""Deterministic synthetic corpora for ingest tests and benchmarks (no downloads).

Documents are English-like prose built from common words, so language ID and the
quality heuristics accept them; helpers derive near-duplicates with known edit rates.
"""

from __future__ import annotations

import json
import random

__all__ = ["edit_words", "english_doc", "raw_record", "true_jaccard"]

_WORDS = ["time", "year", "people", "way", "day", "man", "woman", "child", "world", "life", "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health", "person", "art", "war", "history", "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education", "garden", "river", "bridge", "market", "letter", "window", "road", "harvest", "recipe", "school", "festival", "answer", "music", "doctor", "village", "winter", "summer", "forest", "mountain", "kitchen", "table", "evening", "library"]
_VERBS = ["builds", "describes", "repairs", "remembers", "visits", "studies", "explains", "paints", "carries", "plans", "finds", "shares", "opens", "writes", "reads", "watches", "follows", "changes", "keeps", "brings", "begins", "helps", "shows", "hears", "plays", "moves", "pays", "meets", "includes", "continues", "learns", "leads", "understands", "creates", "considers", "expects", "offers", "serves", "sends", "decides"]
_GLUE = ["the", "a", "an", "this", "that", "their", "our", "his", "her", "every", "some", "many"]
_PREP = ["in", "on", "with", "for", "after", "before", "during", "near", "under", "over", "about", "from", "through", "across"]


def _sentence(rng: random.Random) -> str:
    parts = [rng.choice(_GLUE), rng.choice(_WORDS), rng.choice(_VERBS), rng.choice(_GLUE), rng.choice(_WORDS)]
    for _ in range(rng.randrange(1, 4)):
        parts += [rng.choice(_PREP), rng.choice(_GLUE), rng.choice(_WORDS)]
    if rng.random() < 0.4:
        parts += ["and", rng.choice(_VERBS), rng.choice(_GLUE), rng.choice(_WORDS)]
    s = " ".join(parts)
    return s[0].upper() + s[1:] + "."


def english_doc(rng: random.Random, sentences: int = 12) -> str:
    """A paragraph-structured English-like document of ``sentences`` sentences (~130+ words)."""
    paras = [" ".join(_sentence(rng) for _ in range(min(4, sentences - i))) for i in range(0, sentences, 4)]
    return "\n\n".join(paras)


def edit_words(rng: random.Random, text: str, rate: float) -> str:
    """Replace a fraction ``rate`` of words with random tokens (a near-duplicate); punctuation stays."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), int(len(words) * rate)):
        tail = words[i][len(words[i].rstrip(".,;:!?\n")):]
        words[i] = f"w{rng.randrange(10**9)}{tail}"
    return " ".join(words)


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of word n-gram shingle sets (same normalisation as dedup)."""
    from beam_jobs.dedup.minhash import normalize_for_hash

    def shingles(t: str) -> set[str]:
        w = normalize_for_hash(t).split()
        return {" ".join(w[i : i + n]) for i in range(max(1, len(w) - n + 1))}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def raw_record(doc_id: str, text: str, *, source: str = "web", license: str = "cc-by") -> bytes:
    """A RawRecord JSON line as producers send it."""
    return json.dumps({"id": doc_id, "modality": "text", "source": source, "license": license, "text": text}).encode()
