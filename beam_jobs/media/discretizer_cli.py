"""`headwater discretizer`: train and inspect media RVQ codebook artifacts.

    headwater discretizer train --modality image --input DIR|FILE.jsonl [...] --out ARTIFACTS
    headwater discretizer inspect ARTIFACT_DIR [--input ...]

``train`` decodes a sample of images (files in a directory, or RawRecord JSONL with inline
``data_b64``), trains FAISS residual codebooks, reports per-level utilization/perplexity and PSNR
on the sample, and writes ``ARTIFACTS/image-rvq-<sha12>/``; its name goes in the stream manifest
(``MediaProcessor.manifest()``). Audio uses EnCodec weights by path, so it has nothing to train.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from streams.events import EventError, RawRecord

from .errors import MediaRejected
from .health import level_stats
from .image_decode import ImageQA, decode_image
from .image_rvq import RVQImageTokenizer, psnr

__all__ = ["evaluate", "load_images", "main"]


def _payloads(path: Path) -> Iterator[tuple[str, bytes]]:
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            yield str(f), f.read_bytes()
    elif path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = RawRecord.from_json(line)
                if rec.modality == "image" and rec.data_b64 is not None:
                    yield f"{path}:{n + 1}", rec.payload_bytes()
            except EventError as e:
                print(f"skip {path}:{n + 1}: {e}", file=sys.stderr)
    else:
        yield str(path), path.read_bytes()


def load_images(paths: list[str], side: int, limit: int, qa: ImageQA | None = None) -> np.ndarray:
    """Decode up to ``limit`` images from paths into uint8 [N, side, side, 3]; bad files are skipped."""
    tok = RVQImageTokenizer(RVQImageTokenizer.Config(side=side, grid=1))
    out, skipped = [], 0
    for p in paths:
        for name, data in _payloads(Path(p)):
            if len(out) >= limit:
                break
            try:
                out.append(tok.prepare(decode_image(data, qa or ImageQA())))
            except MediaRejected as e:
                skipped += 1
                print(f"skip {name}: {e}", file=sys.stderr)
    if not out:
        raise SystemExit("discretizer: no decodable images in --input")
    if skipped:
        print(f"skipped {skipped} undecodable/rejected images", file=sys.stderr)
    return np.stack(out)


def evaluate(tok: RVQImageTokenizer, images: np.ndarray) -> dict[str, float]:
    """Per-level utilization/perplexity and mean PSNR (with the mean-colour baseline) on ``images``."""
    codes = tok.encode(images)
    rec = tok.decode(codes)
    out: dict[str, float] = {}
    for level in range(codes.shape[1]):
        util, ppl = level_stats(np.bincount(codes[:, level].reshape(-1).astype(np.int64), minlength=tok.codebook_size))
        out[f"level{level}/utilization"], out[f"level{level}/perplexity"] = util, ppl
    out["psnr_db"] = float(np.mean([psnr(a, b) for a, b in zip(images, rec)]))
    flat = [np.broadcast_to(a.reshape(-1, 3).mean(0), a.shape) for a in images]
    out["baseline_mean_colour_psnr_db"] = float(np.mean([psnr(a, b) for a, b in zip(images, flat)]))
    out["min_utilization"] = min(v for k, v in out.items() if k.endswith("/utilization"))
    return out


def _train(args: argparse.Namespace) -> int:
    if args.modality != "image":
        print(f"discretizer: modality {args.modality!r} has no trainable codebooks here "
              "(audio uses EnCodec weights by --checkpoint; video uses the image codebooks)", file=sys.stderr)
        return 2
    cfg = RVQImageTokenizer.Config(side=args.side, grid=args.grid, levels=args.levels, nbits=args.nbits,
                                   beam=args.beam, train_iters=args.iters, seed=args.seed)
    images = load_images(args.input, args.side, args.max_images)
    t0 = time.perf_counter()
    tok = RVQImageTokenizer(cfg).train(images)
    train_s = time.perf_counter() - t0
    report = evaluate(tok, images)
    out = tok.save(args.out, trained_on=[str(p) for p in args.input], train_images=len(images),
                   train_seconds=round(train_s, 2), report=report)
    print(json.dumps({"artifact": str(out), "name": tok.name, "train_images": len(images),
                      "train_seconds": round(train_s, 2), **report}, indent=1))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    tok = RVQImageTokenizer.load(args.artifact)
    meta = json.loads((Path(args.artifact) / "meta.json").read_text())
    if args.input:
        meta["evaluation"] = evaluate(tok, load_images(args.input, tok.config.side, args.max_images))
    print(json.dumps(meta, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headwater discretizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train image RVQ codebooks on a sample")
    tr.add_argument("--modality", required=True, choices=["image", "video", "audio"])
    tr.add_argument("--input", nargs="+", required=True, help="image directory/files or RawRecord .jsonl")
    tr.add_argument("--out", required=True, help="artifact root; writes <out>/image-rvq-<version>/")
    tr.add_argument("--side", type=int, default=64)
    tr.add_argument("--grid", type=int, default=16)
    tr.add_argument("--levels", type=int, default=8)
    tr.add_argument("--nbits", type=int, default=10)
    tr.add_argument("--beam", type=int, default=1)
    tr.add_argument("--iters", type=int, default=20)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--max-images", type=int, default=5000)
    ins = sub.add_parser("inspect", help="print an artifact's metadata (and evaluate it on --input)")
    ins.add_argument("artifact")
    ins.add_argument("--input", nargs="*", default=[])
    ins.add_argument("--max-images", type=int, default=1000)
    args = parser.parse_args(argv)
    return _train(args) if args.cmd == "train" else _inspect(args)


if __name__ == "__main__":
    sys.exit(main())
