"""PII detection and scrubbing: emails (plain and spelled out), phone numbers, IPv4/IPv6 and MAC
addresses, credit cards (Luhn), IBANs (mod 97), US SSNs, UK NINOs and German Steuer-IDs (check
digit). Every pattern is linear-time: bounded quantifiers or one-pass scanners."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from beam_jobs.filters.base import FilterResult
from beam_jobs.records import Doc

__all__ = [
    "PII_KINDS", "LinearEmail", "ObfuscatedEmail", "PIIScrubber", "iban_ok", "luhn_ok", "pii_spans", "scrub_bytes",
    "scrub_pii",
    "scrub_value", "ssn_ok", "steuer_id_ok",
]


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


_AT_TOKEN = re.compile(
    r"\s{0,3}[\[({<]\s{0,2}(?:at|@|arroba|arobase)\s{0,2}[\])}>]\s{0,3}|\s{1,3}(?:at|AT|arroba|arobase)\s{1,3}")
_OBF_DOT = r"(?:\s{0,3}[\[({<]\s{0,2}(?:dot|punkt|point|punto)\s{0,2}[\])}>]\s{0,3}|\s{1,3}(?:dot|DOT|punkt|punto)\s{1,3})"
_OBF_DOMAIN = re.compile(rf"[\w-]{{1,63}}(?:(?:{_OBF_DOT}|\.)[\w-]{{1,63}}){{0,5}}(?:{_OBF_DOT}|\.)[A-Za-z]{{2,24}}\b")
_OBF_DOT_RE = re.compile(_OBF_DOT)


class ObfuscatedEmail:
    r"""Spelled-out addresses: ``name at domain dot com``, ``name [at] domain [dot] com``,
    ``name(at)domain.de``, ``nombre arroba dominio punto es``, in linear time.

    Each at-token is found once; the local part is at most 64 ``[\w.+-]`` characters before it
    and the domain a bounded regex after it. An unbracketed ``at`` needs a spelled-out ``dot``
    too (``met at google.com`` is prose, not an address).
    """

    @staticmethod
    def sub(repl: Callable[[re.Match], str], text: str) -> str:
        out, last = [], 0
        for tok in _AT_TOKEN.finditer(text):
            at = tok.start()
            if at < last:
                continue
            start = at
            while start > max(last, at - 64) and _EMAIL_LOCAL.match(text, start - 1):
                start -= 1
            while start < at and not _boundary(text, start):
                start += 1
            if start == at:
                continue
            domain = _OBF_DOMAIN.match(text, tok.end())
            if domain is None:
                continue
            bracketed = any(c in tok.group(0) for c in "[({<")
            if not bracketed and _OBF_DOT_RE.search(text, domain.start(), domain.end()) is None:
                continue
            out += [text[last:start], repl(_SPAN.match(text, start, domain.end()))]
            last = domain.end()
        out.append(text[last:])
        return "".join(out)


_VERSION_CONTEXT = re.compile(
    r"(?:\bv|version|vers\.|ver\.|release|build|firmware|versi[oó]n|vers[aã]o|python|node)\s*:?\s*$",
    re.IGNORECASE)
_REFERENCE_CONTEXT = re.compile(
    r"(?:order|invoice|ref|ticket|tracking|sku|isbn|nr\.?|no\.?|n[°º]|#|bestell\w*|rechnung\w*|auftrag\w*|"
    r"commande|facture|pedido|factura|referencia|ordine|fattura)\s*(?:number|nummer|num[ée]ro|n[úu]mero)?"
    r"\s*[:#]?\s*$", re.IGNORECASE)
_DATE = re.compile(r"\b(?:1[89]|20)\d{2}[-./](?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])\b|"
                   r"\b(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|1[0-2])[-./](?:1[89]|20)\d{2}\b|"
                   r"\b(?:0?[1-9]|1[0-2])/(?:0?[1-9]|[12]\d|3[01])/(?:1[89]|20)\d{2}\b")


#: Shapes of other identifiers that failed their own checks: no phone numbers either.
_NOT_PHONE_SHAPE = re.compile(r"\d{3}([- ])\d{2}\1\d{4}$|\d{2} \d{3} \d{3} \d{3}$|\d{1,3}(?:\.\d{1,3}){3}$")
#: Digits that continue an IBAN-shaped token (its check failed): no card number inside it.
_IBAN_BEFORE = re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){0,7} ?$")


#: A number followed by a currency or unit is an amount (``1 234 567 EUR``), not a phone number.
_AMOUNT_AFTER = re.compile(r"\s?(?:€|\$|£|eur|usd|gbp|chf|euro|dollars?|units?|stück|einwohner|habitants|habitantes|"
                           r"inhabitants|abitanti|inwoners|km|kg|t\b|tons?|tonnes?)", re.IGNORECASE)


def _before(m: re.Match, n: int = 40) -> str:
    return m.string[max(0, m.start() - n): m.start()]


def _ipv4_ok(m: re.Match) -> bool:
    return all(int(p) <= 255 for p in m.group(0).split(".")) and not _VERSION_CONTEXT.search(_before(m))


def _ipv6_ok(m: re.Match) -> bool:
    s = m.group(0)
    if s.count(":") < 2 or not any(c not in ":0" for c in s):
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _isbn13_ok(digits: str) -> bool:
    return (len(digits) == 13 and digits[:3] in ("978", "979")
            and sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10 == 0)


def _card_ok(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    return (13 <= len(digits) <= 19 and luhn_ok(digits) and not _isbn13_ok(digits)
            and _DATE.search(m.group(0)) is None and not _REFERENCE_CONTEXT.search(_before(m))
            and not _IBAN_BEFORE.search(_before(m)))


#: ISO 13616 IBAN lengths by country.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21,
    "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18,
    "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23,
    "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26,
    "UA": 29, "VG": 24, "XK": 20,
}


def _iban_end(m: re.Match) -> int | None:
    """The end of the IBAN in the match: its country's length (the match may run on into a
    following word, ``... 0130 00 is``), passing mod 97."""
    s = m.group(0)
    n = IBAN_LENGTHS.get(s[:2].upper())
    if n is None:
        return None
    cut, seen = 0, 0
    while cut < len(s) and seen < n:
        seen += s[cut] != " "
        cut += 1
    if seen < n or (cut < len(s) and s[cut] != " "):
        return None
    return m.start() + cut if iban_ok(s[:cut].replace(" ", "").upper()) else None


def _phone_ok(m: re.Match) -> bool:
    s = m.group(0)
    digits = sum(c.isdigit() for c in s)
    return (9 <= digits <= (15 if s[0] == "+" else 12) and _DATE.search(s) is None and _NOT_PHONE_SHAPE.match(s) is None
            and not _REFERENCE_CONTEXT.search(_before(m)) and not _VERSION_CONTEXT.search(_before(m))
            and not _AMOUNT_AFTER.match(m.string, m.end()) and not _IBAN_BEFORE.search(_before(m)))


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """US SSN issuance rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _ssn_ok(m: re.Match) -> bool:
    return m.group(2) == m.group(4) and ssn_ok(m.group(1), m.group(3), m.group(5))


_NINO_BAD_PREFIXES = frozenset({"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"})


def _nino_ok(m: re.Match) -> bool:
    return m.group(0)[:2].upper() not in _NINO_BAD_PREFIXES


def steuer_id_ok(digits: str) -> bool:
    """German Steuer-ID: 11 digits, no leading 0, one digit repeated (2 or 3 times) in the first ten,
    check digit by ISO 7064 MOD 11,10."""
    if len(digits) != 11 or digits[0] == "0":
        return False
    counts = [digits[:10].count(d) for d in set(digits[:10])]
    if sum(c > 1 for c in counts) != 1 or max(counts) not in (2, 3):
        return False
    product = 10
    for ch in digits[:10]:
        total = (int(ch) + product) % 10 or 10
        product = total * 2 % 11
    return (11 - product) % 10 == int(digits[10])


def _steuer_id_ok(m: re.Match) -> bool:
    return steuer_id_ok(m.group(0).replace(" ", ""))


_Check = Callable[[re.Match], "bool | int | None"]
_HEX = "[0-9A-Fa-f]"
# Order matters: specific, checksummed shapes before the looser phone pattern.
_PATTERNS: list[tuple[str, type[LinearEmail | ObfuscatedEmail] | re.Pattern, _Check | None]] = [
    ("email", LinearEmail, None),
    ("email", ObfuscatedEmail, None),
    ("iban", re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?\b"), _iban_end),
    ("credit_card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), _card_ok),
    ("ssn", re.compile(r"(?<![\w.+/-])(\d{3})([- ])(\d{2})([- ])(\d{4})(?![\w-]|[.,/]\d)"), _ssn_ok),
    ("nino", re.compile(r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"), _nino_ok),
    ("tax_id_de", re.compile(r"(?<![\w.+/-])[1-9]\d(?: ?\d{3}){3}(?![\w-]|[.,/]\d)"), _steuer_id_ok),
    ("mac", re.compile(rf"(?<![\w:.-]){_HEX}{{2}}([:-]){_HEX}{{2}}(?:\1{_HEX}{{2}}){{4}}(?![\w:-]|\.\w)|"
                       rf"(?<![\w.]){_HEX}{{4}}\.{_HEX}{{4}}\.{_HEX}{{4}}(?![\w]|\.\w)"), None),
    ("ipv6", re.compile(rf"(?<![\w:.]){_HEX}{{0,4}}(?::{_HEX}{{0,4}}){{2,7}}(?:(?<=:)(?:\d{{1,3}}\.){{3}}\d{{1,3}})?"
                        rf"(?![\w:]|\.\d)"), _ipv6_ok),
    ("ip", re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"), _ipv4_ok),
    ("phone", re.compile(r"(?<![\w.+/-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ ./-]\d{2,8}){1,5}"
                         r"(?![\w-]|[.,/]\d)"), _phone_ok),
]
PII_KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for k, _, _ in _PATTERNS))


_MASK = "\ue000"  # a private-use, non-word character: masked spans keep every offset


def pii_spans(text: str) -> list[tuple[int, int, str]]:
    """PII spans of ``text`` as sorted ``(start, end, kind)``. Patterns run in order, each on the
    text with earlier spans masked (same length, so offsets stay those of ``text``)."""
    spans: list[tuple[int, int, str]] = []
    for kind, pattern, check in _PATTERNS:
        def sub(m: re.Match, kind=kind, check=check) -> str:
            end = m.end() if check is None else check(m)
            if end is True:
                end = m.end()
            if not end:
                return m.group(0)
            spans.append((m.start(), end, kind))
            return _MASK * (end - m.start()) + m.string[end:m.end()]

        text = pattern.sub(sub, text)
    return sorted(spans)


def scrub_pii(text: str, placeholder: str = "<{kind}>") -> tuple[str, dict[str, int]]:
    """Replace PII spans with ``placeholder``; return the new text and counts per kind."""
    counts: dict[str, int] = {}
    out, last = [], 0
    for start, end, kind in pii_spans(text):
        out += [text[last:start], placeholder.format(kind=kind.upper())]
        counts[kind] = counts.get(kind, 0) + 1
        last = end
    out.append(text[last:])
    return "".join(out), counts


def scrub_value(value: object, placeholder: str = "<{kind}>") -> tuple[object, dict[str, int]]:
    """``value`` with PII scrubbed from every string in it (dicts and lists walked; keys kept)."""
    counts: dict[str, int] = {}

    def walk(v: object) -> object:
        if isinstance(v, str):
            out, c = scrub_pii(v, placeholder)
            for k, n in c.items():
                counts[k] = counts.get(k, 0) + n
            return out
        if isinstance(v, dict):
            return {k: walk(item) for k, item in v.items()}
        if isinstance(v, list):
            return [walk(item) for item in v]
        return v

    return walk(value), counts


def scrub_bytes(raw: bytes) -> bytes:
    """PII scrubbed from raw record bytes (e.g. a dead letter's kept copy); bytes that are not
    UTF-8 pass through unchanged (surrogateescape round trip)."""
    return scrub_pii(bytes(raw).decode("utf-8", "surrogateescape"))[0].encode("utf-8", "surrogateescape")


class PIIScrubber:
    """Scrubs PII from the text and every ``meta`` string in place, records counts in ``doc.lineage['pii']``; optionally drops PII-dense docs."""

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
        meta, meta_counts = scrub_value(doc.meta, self.config.placeholder)
        for kind, n in meta_counts.items():
            counts[kind] = counts.get(kind, 0) + n
        doc.meta = meta
        if counts:
            doc.lineage["pii"] = counts
            limit = self.config.max_pii_per_100_words
            if limit is not None and sum(counts.values()) * 100 / max(1, len(text.split())) > limit:
                return False, "pii_dense"
        doc.text = text
        return True
