"""Throughput (docs/s on one core) of the same filter chain + MinHash: headwater vs datatrove.

Chain (like for like): C4 quality, Gopher quality, Gopher repetition, PII scrubbing, MinHash
signature over word 5-grams (datatrove: its MinhashDedupSignature's shingles + signature;
headwater: shingles, signature, LSH bands and the incremental index check). Datatrove runs
in its own venv (it conflicts with our pins): build it with `bash bench/build_datatrove_venv.sh`.
Usage: .venv/bin/python bench/bench_filters_vs_datatrove.py [--docs 3000] [--datatrove-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

_DATATROVE_WORKER = r"""
import json, sys, time
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
texts = [json.loads(l)["text"] for l in open(sys.argv[1])]
filters = [C4QualityFilter(), GopherQualityFilter(), GopherRepetitionFilter()]
pii = PIIFormatter()
mh = MinhashDedupSignature(output_folder=sys.argv[2])
def chain(i, text):
    doc = Document(text=text, id=str(i))
    for f in filters:
        r = f.filter(doc)
        if r is not True and (r is False or r[0] is False):
            return False
    doc.text = pii.format(doc.text)
    mh.get_signature(mh.get_shingles(doc.text))
    return True
for i, t in enumerate(texts[:50]):
    chain(i, t)
t0 = time.process_time(); kept = sum(chain(i, t) for i, t in enumerate(texts)); dt = time.process_time() - t0
print(json.dumps({"docs": len(texts), "kept": kept, "seconds": dt}))
"""


def ours(texts: list[str], with_language: bool) -> dict:
    from beam_jobs.dedup.index import DedupConfig, DedupIndex, fingerprint
    from beam_jobs.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
        PIIScrubber,
        ToxicityFilter,
        run_filters,
    )
    from beam_jobs.records import Doc, KafkaCoords

    filters = [C4QualityFilter(), GopherQualityFilter(), GopherRepetitionFilter(), PIIScrubber()]
    if with_language:
        filters = [LanguageFilter(), *filters, ToxicityFilter()]
    for f in filters:
        getattr(f, "setup", lambda: None)()
    config = DedupConfig()
    hasher, index = config.hasher(), DedupIndex(config)

    def chain(i: int, text: str) -> bool:
        doc = run_filters(filters, Doc(coords=KafkaCoords("b", 0, i), id=str(i), source="b", license="", text=text))
        if doc.dropped:
            return False
        index.check_and_add(fingerprint(doc.id, doc.text, config, hasher))
        return True

    for i, t in enumerate(texts[:50]):
        chain(-i - 1, t)
    index = DedupIndex(config)
    t0 = time.process_time()
    kept = sum(chain(i, t) for i, t in enumerate(texts))
    return {"docs": len(texts), "kept": kept, "seconds": time.process_time() - t0}


def main() -> None:
    from beam_jobs.synthetic import english_doc

    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--datatrove-python", default="build/datatrove-venv/bin/python")
    a = ap.parse_args()
    if not os.path.exists(a.datatrove_python):
        sys.exit(f"{a.datatrove_python} not found: run `bash bench/build_datatrove_venv.sh` first")
    rng = random.Random(0)
    texts = [english_doc(rng) + (f" Mail me at user{i}@example.com." if i % 10 == 0 else "") for i in range(a.docs)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "docs.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        out = subprocess.run([a.datatrove_python, "-c", _DATATROVE_WORKER, path, os.path.join(tmp, "mh")],
                             capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
    mine = ours(texts, with_language=False)
    full = ours(texts, with_language=True)
    rate = lambda r: r["docs"] / r["seconds"]
    print(f"datatrove  {rate(theirs):8.0f} docs/s/core  (kept {theirs['kept']}/{theirs['docs']})")
    print(f"headwater  {rate(mine):8.0f} docs/s/core  (kept {mine['kept']}/{mine['docs']})")
    print(f"headwater + lingua language ID + toxicity: {rate(full):8.0f} docs/s/core")
    print(f"ratio headwater/datatrove (same chain): {rate(mine) / rate(theirs):.2f}x")


if __name__ == "__main__":
    main()
