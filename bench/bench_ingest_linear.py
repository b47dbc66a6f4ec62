"""Linear-time checks of ingest (issue 14): the duplicate-key JSON check and the PII patterns.

Times the shipped code and, for reference, the quadratic code it replaced (kept here only as
the baseline) on adversarial inputs at growing sizes; the old code is skipped where it would
run for minutes. Prints a markdown table (docs/RELIABILITY.md, "Ingest isolation").

    .venv/bin/python bench/bench_ingest_linear.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import re
import time

from beam_jobs.filters import pii
from beam_jobs.validate import Invalid, no_duplicate_keys

OLD_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")


def oldno_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise Invalid("duplicate_field", f"field {dup!r} appears more than once")
    return dict(pairs)


def dup_json(keys: int) -> str:
    return "{" + ",".join(f'"k{i}":1' for i in range(keys)) + f',"k{keys - 1}":2}}'


def best(fn, arg, repeat: int) -> float:
    out = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            fn(arg)
        except Invalid:
            pass
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for keys in (8_000, 32_000, 128_000):
        text = dup_json(keys)
        old = best(lambda t: json.loads(t, object_pairs_hook=oldno_duplicate_keys), text, 1) if keys <= 32_000 else None
        new = best(lambda t: json.loads(t, object_pairs_hook=no_duplicate_keys), text, a.repeat)
        rows.append(("duplicate keys, repeat at the end", f"{keys:,} keys", old, new))
    shapes = (("PII email, `a.a.a...`", lambda n: "a." * (n // 2)), ("PII email, `1.1.1...`", lambda n: "1." * (n // 2)),
              ("PII email, `a.a.a...a@`", lambda n: "a." * (n // 2) + "@"), ("PII email, `a@a@a@...`", lambda n: "a@" * (n // 2)))
    for label, make in shapes:
        for n in (32_000, 100_000, 1_000_000):
            text = make(n)
            old = best(lambda t: OLD_EMAIL.sub("", t), text, 1) if n <= 32_000 else None
            new = best(lambda t: pii.LinearEmail.sub(lambda m: "", t), text, a.repeat)
            rows.append((label, f"{n // 1000} kB", old, new))
    for n in (500_000, 1_000_000):
        rows.append(("all PII patterns (`scrub_pii`), `1.1.1...`", f"{n // 1000} kB", None,
                     best(pii.scrub_pii, "1." * (n // 2), a.repeat)))
    print("| input | size | before (s) | after (s) |\n|---|---|---|---|")
    for label, size, old, new in rows:
        print(f"| {label} | {size} | {'-' if old is None else f'{old:.3f}'} | {new:.4f} |")


if __name__ == "__main__":
    main()
