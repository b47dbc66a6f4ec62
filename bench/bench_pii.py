"""PII detection precision/recall per entity type: headwater vs datatrove's PIIFormatter vs Presidio.

The corpus is generated (fixed seed) and labelled: multilingual snippets (en/de/fr/es/it/nl
templates) each holding 0-2 PII values and 1-3 hard negatives (dates, times, versions, order
numbers, prices, thousands-separated amounts, UUIDs, hex digests, and checksum-failing look-alikes:
Luhn-failing cards, invalid SSNs/NINOs/Steuer-IDs/IBANs, out-of-range IPs, prose "at").

Scoring is per entity type and typed: a gold value is found when a prediction of the same type
overlaps it; a prediction is correct when it overlaps a gold value of its type. Tools that lack a
type show "-" (not scored). Datatrove runs in its own venv (`bash bench/build_datatrove_venv.sh`);
Presidio in another (`python3.11 -m venv V && V/bin/pip install presidio-analyzer`), with a blank
spaCy pipeline when no trained model is installed (its pattern recognizers need none; NER-only
types are then absent). Both are optional: missing interpreters are reported and skipped.

Usage: .venv/bin/python bench/bench_pii.py [--snippets 2400] [--seed 0]
       [--datatrove-python build/datatrove-venv/bin/python] [--presidio-python /tmp/presidio-venv/bin/python]
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("email", "phone", "ip", "ipv6", "mac", "credit_card", "iban", "ssn", "nino", "tax_id_de")

# ---------------------------------------------------------------------------------------------- values

FIRST = ["anna", "jonas", "marie", "lucas", "sofia", "mateo", "giulia", "daan", "emma", "noah", "lea", "hugo",
         "carmen", "pieter", "chloé", "jürgen"]
LAST = ["schmidt", "dupont", "garcia", "rossi", "jansen", "smith", "müller", "martin", "lopez", "bianchi"]
DOMAINS = ["example.com", "mail.de", "correo.es", "posteo.de", "orange.fr", "libero.it", "ziggo.nl",
           "uni-heidelberg.de", "company.co.uk", "gmx.net"]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def email(rng: random.Random) -> str:
    f, last, dom = rng.choice(FIRST), rng.choice(LAST), rng.choice(DOMAINS)
    local = rng.choice([f"{f}.{last}", f"{f}{rng.randint(1, 99)}", f"{f[0]}.{last}", f"{f}+news", f"{f}_{last}"])
    if rng.random() < 0.3:  # spelled out
        name, tld = dom.rsplit(".", 1)
        name = name.replace(".", rng.choice([" dot ", " [dot] "]))
        return rng.choice([f"{local} at {name} dot {tld}", f"{local} [at] {name} [dot] {tld}",
                           f"{local}(at){dom}", f"{local} (at) {name} (dot) {tld}",
                           f"{local} arroba {name} punto {tld}"])
    return f"{local}@{dom}" if rng.random() < 0.8 else f"{local}@{dom}".upper()


def phone(rng: random.Random) -> str:
    d = lambda n: _digits(rng, n)
    return rng.choice([
        f"({rng.randint(201, 989)}) {d(3)}-{d(4)}", f"{rng.randint(201, 989)}-{rng.randint(200, 999)}-{d(4)}",
        f"+1 {rng.randint(201, 989)} {d(3)} {d(4)}", f"+49 30 {d(8)}", f"030 {d(7)}", f"+49 171 {d(7)}",
        f"0{rng.randint(151, 179)}/{d(7)}", f"06 {d(2)} {d(2)} {d(2)} {d(2)}", f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"+34 6{d(2)} {d(3)} {d(3)}", f"+44 20 {d(4)} {d(4)}", f"020 {d(4)} {d(4)}", f"+39 06 {d(4)} {d(4)}",
        f"+31 20 {d(3)} {d(4)}", f"01.{d(2)}.{d(2)}.{d(2)}.{d(2)}",
    ])


def ipv4(rng: random.Random) -> str:
    first = rng.choice([8, 23, 45, 77, 91, 104, 151, 185, 203, 212, 10, 172, 192])
    return f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def ipv6(rng: random.Random) -> str:
    g = lambda: f"{rng.randint(1, 0xFFFF):x}"
    return rng.choice([
        ":".join(f"{rng.randint(0, 0xFFFF):04x}" for _ in range(8)),
        f"2001:db8::{g()}:{g()}", f"fe80::{g()}:{g()}:{g()}:{g()}", f"2a02:{g()}:{g()}::{g()}",
        f"::ffff:{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
    ])


def mac(rng: random.Random) -> str:
    octets = [f"{rng.randint(0, 255):02x}" for _ in range(6)]
    if rng.random() < 0.5:
        octets = [o.upper() for o in octets]
    style = rng.random()
    if style < 0.45:
        return ":".join(octets)
    if style < 0.8:
        return "-".join(octets)
    h = "".join(octets).lower()
    return f"{h[:4]}.{h[4:8]}.{h[8:]}"


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    from beam_jobs.filters.pii import luhn_ok

    body = prefix + _digits(rng, length - len(prefix) - 1)
    return next(body + c for c in string.digits if luhn_ok(body + c))


def credit_card(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        n = _luhn_complete(rng.choice(["34", "37"]), 15, rng)
        return f"{n[:4]} {n[4:10]} {n[10:]}"
    n = _luhn_complete(rng.choice(["4", "51", "55", "2221"]), 16, rng)
    sep = rng.choice([" ", "-", ""])
    return sep.join(n[i:i + 4] for i in range(0, 16, 4))


IBAN_BBAN = {"DE": 18, "FR": 23, "ES": 20, "GB": 18, "NL": 14, "IT": 23, "AT": 16, "BE": 12}


def _iban_check(country: str, bban: str) -> str:
    s = bban + country + "00"
    n = int("".join(str(int(ch, 36)) for ch in s))
    return f"{98 - n % 97:02d}"


def iban(rng: random.Random, *, valid: bool = True) -> str:
    country = rng.choice(list(IBAN_BBAN))
    if country == "GB":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 14)
    elif country == "NL":
        bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, 10)
    else:
        bban = _digits(rng, IBAN_BBAN[country])
    check = _iban_check(country, bban)
    if not valid:
        check = f"{(int(check) + rng.randint(1, 90)) % 97 + 2:02d}"
    compact = country + check + bban
    style = rng.random()
    if style < 0.45:
        out = " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    elif style < 0.75:
        out = compact
    else:
        out = " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    return out.lower() if style >= 0.75 or rng.random() < 0.15 else out


def ssn(rng: random.Random, *, valid: bool = True) -> str:
    if valid:
        area = rng.choice([n for n in range(1, 900) if n != 666])
        a, g, s = f"{area:03d}", f"{rng.randint(1, 99):02d}", f"{rng.randint(1, 9999):04d}"
    else:
        a, g, s = rng.choice([("000", f"{rng.randint(1, 99):02d}", _digits(rng, 4)),
                              ("666", f"{rng.randint(1, 99):02d}", _digits(rng, 4)),
                              (f"9{_digits(rng, 2)}", f"{rng.randint(1, 99):02d}", _digits(rng, 4)),
                              (f"{rng.randint(1, 665):03d}", "00", _digits(rng, 4))])
    sep = rng.choice(["-", "-", " "])
    return f"{a}{sep}{g}{sep}{s}"


NINO_FIRST = "ABCEGHJKLMNOPRSTWXYZ"
NINO_SECOND = "ABCEGHJKLMNPRSTWXYZ"


def nino(rng: random.Random, *, valid: bool = True) -> str:
    if valid:
        prefix = "GB"
        while prefix in ("BG", "GB", "NK", "KN", "TN", "NT", "ZZ"):
            prefix = rng.choice(NINO_FIRST) + rng.choice(NINO_SECOND)
    else:
        prefix = rng.choice(["GB", "BG", "NK", "TN", "ZZ"])
    d = _digits(rng, 6)
    suffix = rng.choice("ABCD")
    return f"{prefix} {d[:2]} {d[2:4]} {d[4:]} {suffix}" if rng.random() < 0.5 else f"{prefix}{d}{suffix}"


def _steuer_check(first10: str) -> str:
    product = 10
    for ch in first10:
        total = (int(ch) + product) % 10 or 10
        product = total * 2 % 11
    return str((11 - product) % 10)


def tax_id_de(rng: random.Random, *, valid: bool = True) -> str:
    digits = rng.sample(string.digits, 9)
    while digits[0] == "0":
        rng.shuffle(digits)
    repeated = rng.choice(digits)
    body = digits + [repeated]
    rest = body[1:]
    rng.shuffle(rest)
    first10 = body[0] + "".join(rest)
    check = _steuer_check(first10)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    n = first10 + check
    return f"{n[:2]} {n[2:5]} {n[5:8]} {n[8:]}" if rng.random() < 0.4 else n


GENERATORS = {"email": email, "phone": phone, "ip": ipv4, "ipv6": ipv6, "mac": mac, "credit_card": credit_card,
              "iban": iban, "ssn": ssn, "nino": nino, "tax_id_de": tax_id_de}


def _luhn_failing(card: str) -> str:
    return card[:-1] + str((int(card[-1]) + 1) % 10)


def hard_negative(rng: random.Random) -> str:
    d = lambda n: _digits(rng, n)
    y, mo, da = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([
        f"{y}-{mo:02d}-{da:02d}", f"{da:02d}.{mo:02d}.{y}", f"{mo}/{da}/{y}", f"{da:02d}/{mo:02d}/{y}",
        f"{y}-{mo:02d}-{da:02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        f"{y}-{mo:02d}-{da:02d} {y}-{mo:02d}-{rng.randint(1, 28):02d}", f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00",
        f"v{rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}",
        f"version {rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 99)}",
        f"Python {rng.randint(2, 3)}.{rng.randint(0, 13)}.{rng.randint(0, 20)}",
        f"release {rng.randint(1, 30)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}",
        f"Order #{y}-{d(6)}", f"Bestellnummer: {d(10)}", f"commande n° {d(9)}", f"pedido {y}/{d(6)}",
        f"invoice no. {d(3)}-{d(3)}-{d(4)}", f"ticket #{d(8)}", f"ISBN 978-3-{d(5)}-{d(3)}-{d(1)}",
        f"${rng.randint(1, 99)},{d(3)}.{d(2)}", f"{rng.randint(1, 99)}.{d(3)},{d(2)} €", f"EUR {rng.randint(1, 999)},{d(2)}",
        f"{rng.randint(1, 999)} {d(3)} {d(3)} EUR", f"{rng.randint(1, 99)} {d(3)} {d(3)} Einwohner",
        "-".join(["".join(rng.choice("0123456789abcdef") for _ in range(k)) for k in (8, 4, 4, 4, 12)]),
        "".join(rng.choice("0123456789abcdef") for _ in range(40)), f"0x{rng.randint(0, 2**32):08x}",
        _luhn_failing(credit_card(rng)),
        ssn(rng, valid=False), nino(rng, valid=False), tax_id_de(rng, valid=False), iban(rng, valid=False),
        f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
        "meet me at the station", "look at the results dot by dot", f"{rng.randint(10, 99)}:{rng.randint(10, 59)}",
    ])


# ----------------------------------------------------------------------------------------- templates

TEMPLATES = {
    "en": ["Please contact {pii} before {neg}.", "As of {neg}, the record lists {pii} for the account.",
           "Reference {neg}; customer detail: {pii}.", "{pii} was logged together with {neg} in the report."],
    "de": ["Bitte wenden Sie sich bis {neg} an {pii}.", "Laut Unterlagen vom {neg} lautet die Angabe {pii}.",
           "Kundendaten: {pii} (Vorgang {neg}).", "Die Angabe {pii} wurde mit {neg} gespeichert."],
    "fr": ["Veuillez contacter {pii} avant le {neg}.", "Selon le dossier du {neg}, l'information est {pii}.",
           "Données client : {pii} (réf. {neg}).", "L'élément {pii} a été enregistré avec {neg}."],
    "es": ["Por favor contacte {pii} antes del {neg}.", "Según el registro del {neg}, el dato es {pii}.",
           "Datos del cliente: {pii} ({neg}).", "El dato {pii} se guardó junto con {neg}."],
    "it": ["Si prega di contattare {pii} entro il {neg}.", "Secondo la pratica del {neg}, il dato è {pii}.",
           "Dati cliente: {pii} (rif. {neg})."],
    "nl": ["Neem contact op via {pii} voor {neg}.", "Volgens het dossier van {neg} is het gegeven {pii}.",
           "Klantgegevens: {pii} ({neg})."],
}
NEG_ONLY = {
    "en": "The build {neg} shipped on {neg2} with no changes.", "de": "Die Version {neg} erschien am {neg2}.",
    "fr": "La mise à jour {neg} est sortie le {neg2}.", "es": "La versión {neg} salió el {neg2}.",
    "it": "La versione {neg} è uscita il {neg2}.", "nl": "Versie {neg} verscheen op {neg2}.",
}


def generate(n: int, seed: int = 0) -> list[dict]:
    """``n`` labelled snippets: ``{"lang", "text", "spans": [[start, end, kind], ...]}``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lang = rng.choice(list(TEMPLATES))
        if i % 6 == 5:  # negatives only
            text, spans = _fill(NEG_ONLY[lang], {"neg": hard_negative(rng), "neg2": hard_negative(rng)}, None)
            out.append({"lang": lang, "text": text, "spans": spans})
            continue
        kind = KINDS[i % len(KINDS)] if rng.random() < 0.8 else rng.choice(KINDS)
        text, spans = _fill(rng.choice(TEMPLATES[lang]), {"pii": GENERATORS[kind](rng), "neg": hard_negative(rng)},
                            kind)
        if rng.random() < 0.35:  # a second value of another kind
            k2 = rng.choice(KINDS)
            extra, extra_spans = _fill(rng.choice(TEMPLATES[lang]), {"pii": GENERATORS[k2](rng),
                                                                    "neg": hard_negative(rng)}, k2)
            shift = len(text) + 1
            text += " " + extra
            spans += [[s + shift, e + shift, k] for s, e, k in extra_spans]
        out.append({"lang": lang, "text": text, "spans": spans})
    return out


def _fill(template: str, values: dict[str, str], kind: str | None) -> tuple[str, list[list]]:
    text, spans, pos = "", [], 0
    while pos < len(template):
        j = template.find("{", pos)
        if j == -1:
            text += template[pos:]
            break
        k = template.index("}", j)
        text += template[pos:j]
        value = values[template[j + 1:k]]
        if template[j + 1:k] == "pii":
            spans.append([len(text), len(text) + len(value), kind])
        text += value
        pos = k + 1
    return text, spans


# ------------------------------------------------------------------------------------------- scoring

def score(snippets: list[dict], predictions: list[list[tuple[int, int, str]]]) -> dict[str, dict[str, float]]:
    """Typed, overlap-based precision and recall per kind."""
    tally = {k: {"gold": 0, "found": 0, "pred": 0, "correct": 0} for k in KINDS}
    for snip, preds in zip(snippets, predictions, strict=True):
        overlap = lambda a, b: a[0] < b[1] and b[0] < a[1]
        for g in snip["spans"]:
            tally[g[2]]["gold"] += 1
            tally[g[2]]["found"] += any(p[2] == g[2] and overlap(p, g) for p in preds)
        for p in preds:
            if p[2] in tally:
                tally[p[2]]["pred"] += 1
                tally[p[2]]["correct"] += any(g[2] == p[2] and overlap(p, g) for g in snip["spans"])
    return {k: {"precision": t["correct"] / t["pred"] if t["pred"] else 1.0,
                "recall": t["found"] / t["gold"] if t["gold"] else 1.0, **t} for k, t in tally.items()}


def headwater_spans(text: str) -> list[tuple[int, int, str]]:
    """Spans headwater's scrubber replaces (``pii_spans``: what ``scrub_pii`` replaces)."""
    from beam_jobs.filters.pii import pii_spans

    return pii_spans(text)


def diff_spans(text: str, out: str, kind_of) -> list[tuple[int, int, str]]:
    """Spans of ``text`` changed in ``out`` (fragments closer than 3 characters merged), each typed by
    ``kind_of`` of the original token it falls in (a replacement may share characters with it)."""
    regions: list[list] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, text, out, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if regions and i1 - regions[-1][1] < 3:
            regions[-1][1], regions[-1][2] = i2, regions[-1][2] + out[j1:j2]
        else:
            regions.append([i1, i2, out[j1:j2]])
    return [(a, max(b, a + 1), kind_of(_token(text, a, b))) for a, b, _ in regions]


def _token(text: str, a: int, b: int) -> str:
    """The whitespace-delimited token(s) of ``text`` around ``[a, b)``: what a changed fragment belonged to."""
    while a > 0 and not text[a - 1].isspace():
        a -= 1
    while b < len(text) and not text[b].isspace():
        b += 1
    return text[a:b]


_DATATROVE = r"""
import json, sys
from datatrove.pipeline.formatters import PIIFormatter
pii = PIIFormatter()  # defaults: emails and public IPv4 addresses
for line in sys.stdin:
    print(json.dumps(pii.format(json.loads(line))))
"""

_PRESIDIO = r"""
import json, sys
import spacy
from presidio_analyzer import AnalyzerEngine
from presidio_analyzer.nlp_engine import SpacyNlpEngine
model = "blank"
try:
    nlp = spacy.load("en_core_web_sm"); model = "en_core_web_sm"
except OSError:
    nlp = spacy.blank("en")
engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "en_core_web_sm"}])
engine.nlp = {"en": nlp}
analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
print(json.dumps({"model": model, "entities": sorted(analyzer.get_supported_entities("en"))}))
for line in sys.stdin:
    res = analyzer.analyze(json.loads(line), language="en")
    print(json.dumps([[r.start, r.end, r.entity_type, r.score] for r in res]))
"""

PRESIDIO_KINDS = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "credit_card", "IBAN_CODE": "iban",
                  "US_SSN": "ssn", "UK_NINO": "nino", "MAC_ADDRESS": "mac", "DE_TAX_ID": "tax_id_de"}


def _run_worker(python: str, code: str, texts: list[str]) -> tuple[list[str], float]:
    with tempfile.TemporaryFile("w+") as f:
        f.writelines(json.dumps(t) + "\n" for t in texts)
        f.seek(0)
        t0 = time.perf_counter()
        out = subprocess.run([python, "-c", code], stdin=f, capture_output=True, text=True, check=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    return out.stdout.strip().splitlines(), time.perf_counter() - t0


def datatrove_predictions(python: str, snippets: list[dict]) -> tuple[list, float]:
    lines, dt = _run_worker(python, _DATATROVE, [s["text"] for s in snippets])
    kind_of = lambda rep: "email" if "@" in rep else "ip"
    return [diff_spans(s["text"], json.loads(line), kind_of) for s, line in zip(snippets, lines, strict=True)], dt


def presidio_predictions(python: str, snippets: list[dict]) -> tuple[list, float, dict]:
    lines, dt = _run_worker(python, _PRESIDIO, [s["text"] for s in snippets])
    info = json.loads(lines[0])
    preds = []
    for s, line in zip(snippets, lines[1:], strict=True):
        spans = []
        for a, b, ent, _ in json.loads(line):
            kind = ("ipv6" if ":" in s["text"][a:b] else "ip") if ent == "IP_ADDRESS" else PRESIDIO_KINDS.get(ent)
            if kind:
                spans.append((a, b, kind))
        preds.append(spans)
    return preds, dt, info


def table(results: dict[str, dict | None], supported: dict[str, set[str]]) -> str:
    head = "| entity | gold | " + " | ".join(f"{name} P | {name} R" for name in results) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(results))]
    any_scores = next(r for r in results.values() if r)
    for k in KINDS:
        cells = []
        for name, r in results.items():
            if r is None or k not in supported[name]:
                cells += ["-", "-"]
            else:
                cells += [f"{r[k]['precision']:.3f}", f"{r[k]['recall']:.3f}"]
        rows.append(f"| {k} | {any_scores[k]['gold']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snippets", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datatrove-python", default="build/datatrove-venv/bin/python")
    ap.add_argument("--presidio-python", default="/tmp/presidio-venv/bin/python")
    a = ap.parse_args()
    snippets = generate(a.snippets, a.seed)
    print(f"{len(snippets)} snippets, {sum(len(s['spans']) for s in snippets)} PII values, "
          f"languages {sorted({s['lang'] for s in snippets})}")
    t0 = time.perf_counter()
    ours = [headwater_spans(s["text"]) for s in snippets]
    timings = {"headwater": time.perf_counter() - t0}
    results: dict[str, dict | None] = {"headwater": score(snippets, ours)}
    supported = {"headwater": set(KINDS), "datatrove": {"email", "ip"}}
    if os.path.exists(a.datatrove_python):
        preds, timings["datatrove"] = datatrove_predictions(a.datatrove_python, snippets)
        results["datatrove"] = score(snippets, preds)
    else:
        print(f"datatrove: {a.datatrove_python} not found (bash bench/build_datatrove_venv.sh); skipped")
    if os.path.exists(a.presidio_python):
        preds, timings["presidio"], info = presidio_predictions(a.presidio_python, snippets)
        results["presidio"] = score(snippets, preds)
        supported["presidio"] = {PRESIDIO_KINDS[e] for e in info["entities"] if e in PRESIDIO_KINDS}
        if "IP_ADDRESS" in info["entities"]:
            supported["presidio"] |= {"ip", "ipv6"}
        print(f"presidio: spaCy model {info['model']}; entities {info['entities']}")
    else:
        print(f"presidio: {a.presidio_python} not found; skipped")
    print(table(results, supported))
    print("seconds for the whole set: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    worst = min(min(r["precision"], r["recall"]) for r in results["headwater"].values())
    print(f"headwater worst P/R over all types: {worst:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
