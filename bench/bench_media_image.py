"""Image tokenization: codebook training, images/s, PSNR and per-level utilization at 2 settings.

    .venv/bin/python bench/bench_media_image.py [--train 600 --test 200]

Codebooks are trained on procedural images (beam_jobs.media.synth); throughput is
MediaProcessor.image on PNG bytes (decode + QA + pHash dedup + RVQ encode + vocab layout),
PSNR is on held-out images against the mean-colour baseline measured in the same run, and
utilization (used codes / codebook size per level) is measured on the training set.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import faiss
import numpy as np

from beam_jobs.media import MediaConfig, synth
from beam_jobs.media.discretizer_cli import evaluate
from beam_jobs.media.image_rvq import RVQImageTokenizer
from streams.events import RawRecord

SETTINGS = {"4x256 (grid 16, side 64)": {"levels": 4, "nbits": 8}, "8x1024 (grid 16, side 64)": {"levels": 8, "nbits": 10}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    probe = RVQImageTokenizer.Config().build()
    train = np.stack([probe.prepare(synth.procedural_image(i, (96, 96))) for i in range(args.train)])
    test_rgb = [synth.procedural_image(10**6 + i, (96, 96)) for i in range(args.test)]
    items = [(RawRecord(id=f"i{i}", modality="image", source="bench", license="cc0", data_b64="AA=="),
              synth.encode_image(im)) for i, im in enumerate(test_rgb)]
    print(f"image: train {args.train}, test {args.test} procedural images, faiss threads {args.threads}")
    for name, kw in SETTINGS.items():
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            tok = RVQImageTokenizer.Config(**kw).build().train(train)
            train_s = time.perf_counter() - t0
            art = tok.save(root)
            util = evaluate(tok, train)
            proc = MediaConfig(image_codebooks=str(art)).build()
            proc.image(items[:4])
            proc.dedup = proc.config.dedup.build()
            t0 = time.perf_counter()
            results = proc.image(items)
            dt = time.perf_counter() - t0
            kept = sum(r.sample is not None for r in results)
            held = evaluate(tok, np.stack([tok.prepare(im) for im in test_rgb]))
            print(f"{name:26s} train {train_s:6.1f} s | {kept / dt:7.1f} images/s ({kept} kept) | "
                  f"PSNR {held['psnr_db']:.2f} dB vs mean-colour {held['baseline_mean_colour_psnr_db']:.2f} dB | "
                  f"min level utilization (train set) {util['min_utilization']:.1%}, held-out {held['min_utilization']:.1%}")


if __name__ == "__main__":
    main()
