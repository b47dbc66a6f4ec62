"""PII detection and scrubbing: emails, phone numbers, IPv4 addresses, credit cards (Luhn), IBANs (mod 97)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from beam_jobs.filters.base import FilterResult
from beam_jobs.records import Doc

__all__ = ["PII_KINDS", "LinearEmail", "PIIScrubber", "iban_ok", "luhn_ok", "scrub_pii"]


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 mod-97 check of an IBAN without spaces."""
    s = iban[4:] + iban[:4]
    try:
        return int("".join(str(int(ch, 36)) for ch in s)) % 97 == 1
    except ValueError:
        return False


def _ipv4_ok(m: re.Match) -> bool:
    return all(int(p) <= 255 for p in m.group(0).split("."))


def _card_ok(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _iban_check(m: re.Match) -> bool:
    return iban_ok(re.sub(r"\s", "", m.group(0)).upper())


def _phone_ok(m: re.Match) -> bool:
    return 9 <= len(re.sub(r"\D", "", m.group(0))) <= 15


_EMAIL_LOCAL = re.compile(r"[\w.+-]")
_EMAIL_DOMAIN = re.compile(r"[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
_WORD = re.compile(r"\w")
_SPAN = re.compile(r".*", re.DOTALL)  # ``_SPAN.match(text, i, j)``: a Match of exactly text[i:j]


class LinearEmail:
    r"""Matches of ``\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b`` in linear time.

    The regex itself is quadratic on long runs of local-part characters without a valid
    address (``a.a.a…``): every start position rescans the run. Here each ``@`` is found once,
    its local part is the run of ``[\w.+-]`` before it (from its leftmost word boundary, as
    the regex's leftmost match), and only the domain after it is matched by a regex.
    """

    @staticmethod
    def sub(repl: Callable[[re.Match], str], text: str) -> str:
        out, last, at = [], 0, text.find("@")
        while at != -1:
            start = at
            while start > last and _EMAIL_LOCAL.match(text, start - 1):
                start -= 1
            while start < at and not _boundary(text, start):
                start += 1
            domain = _EMAIL_DOMAIN.match(text, at + 1) if start < at else None
            if domain is None:
                at = text.find("@", at + 1)
                continue
            out += [text[last:start], repl(_SPAN.match(text, start, domain.end()))]
            last = domain.end()
            at = text.find("@", last)
        out.append(text[last:])
        return "".join(out)


def _boundary(text: str, i: int) -> bool:
    """``\b`` at ``i``: exactly one of the characters around it is a word character."""
    before = i > 0 and _WORD.match(text, i - 1) is not None
    after = i < len(text) and _WORD.match(text, i) is not None
    return before != after


# Order matters: structured numbers (IBAN, card) before the looser phone pattern.
_PATTERNS: list[tuple[str, re.Pattern | type[LinearEmail], Callable[[re.Match], bool] | None]] = [
    ("email", LinearEmail, None),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban_check),
    ("credit_card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), _card_ok),
    ("ip", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), _ipv4_ok),
    ("phone", re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w.]\d)"), _phone_ok),
]
PII_KINDS: tuple[str, ...] = tuple(k for k, _, _ in _PATTERNS)


def scrub_pii(text: str, placeholder: str = "<{kind}>") -> tuple[str, dict[str, int]]:
    """Replace PII spans with ``placeholder``; return the new text and counts per kind."""
    counts: dict[str, int] = {}
    for kind, pattern, check in _PATTERNS:
        def sub(m: re.Match, kind=kind, check=check) -> str:
            if check is not None and not check(m):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return placeholder.format(kind=kind.upper())

        text = pattern.sub(sub, text)
    return text, counts


class PIIScrubber:
    """Scrubs PII in place and records counts in ``doc.lineage['pii']``; optionally drops PII-dense docs."""

    name = "pii"

    @dataclass(kw_only=True, slots=True)
    class Config:
        placeholder: str = "<{kind}>"
        max_pii_per_100_words: float | None = None

        def build(self) -> PIIScrubber:
            return PIIScrubber(self)

    def __init__(self, config: PIIScrubber.Config | None = None):
        self.config = config or PIIScrubber.Config()

    def filter(self, doc: Doc) -> FilterResult:
        text, counts = scrub_pii(doc.text, self.config.placeholder)
        if counts:
            doc.lineage["pii"] = counts
            limit = self.config.max_pii_per_100_words
            if limit is not None and sum(counts.values()) * 100 / max(1, len(text.split())) > limit:
                return False, "pii_dense"
        doc.text = text
        return True
