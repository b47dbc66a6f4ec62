"""Image near-dup quality: pHash alone vs pHash + verification, on planted near-duplicates among
distinct look-alike images (``beam_jobs.media.lookalikes``: gradients, smoothed-noise textures,
checkerboards, stripes, procedural scenes; edits: JPEG, resize, crop, brightness/contrast,
noise, watermark text).

Thresholds were tuned on seeds 1, 3 and 7; the default seed here (2026) was not looked at while
tuning. Rows, in one run on the same images:
- ``phash_only``: the previous behaviour (Hamming <= 10 on the 64-bit pHash decides);
- ``phash+verify``: pHash candidates confirmed by thumbnail SSIM, colour, coarse structure,
  fine detail and per-channel spread;
- ``phash+colour+verify``: the default: also candidates met on the mean-colour route.
``--beam N`` also runs the first N images through the keyed-state ``MediaDedup`` chain on the
FnApiRunner, in order, and reports whether its decisions equal the in-memory index's.

``--videos N`` does the same for videos (``beam_jobs.media.video_lookalikes``: N distinct MP4s,
motion on shared backgrounds incl. time-reversed paths, rotating gradients, pans, multi-shot;
planted re-encodes, rescales and trims). Rows: ``keyframe_phash_only`` (K = 8 keyframe pHashes
within the radius, order preserved, no verification), ``keyframe_image_verify`` (each keyframe
pair confirmed by the image decision) and ``keyframe_verify+local`` (the default: also the worst
colour cell and the worst shift-tolerant SSIM block). Video thresholds were tuned on seeds 1 and 2.
``--video-beam N`` runs the first N videos through ``MediaDedup`` as ``--beam`` does.

Usage: .venv/bin/python bench/bench_media_dedup.py [--images 600] [--seed 2026] [--beam 120]
       [--videos 150] [--video-beam 40]
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import time

from beam_jobs.media.dedup_transform import MediaDedup, MediaDedupConfig
from beam_jobs.media.lookalikes import generate, score
from beam_jobs.media.near_dup import NearDupConfig, NearDupIndex, encode, fingerprint


def _expected(index, fps) -> dict:
    """The in-memory index's decisions, in order: name -> dup_of (None: kept)."""
    expected = {}
    for fp in fps:
        hit = index.check(fp)
        expected[fp.record_id] = hit[1].record_id if hit else None
        if hit is None:
            index.add(fp)
    return expected


def _beam_agrees(images, config: NearDupConfig) -> dict:
    """Decisions of MediaDedup (FnApiRunner, one record per offset) vs the in-memory index."""
    from beam_jobs.media import synth

    expected = _expected(NearDupIndex(config), [fingerprint(im.rgb, im.name, ("bench", 0, i))
                                                for i, im in enumerate(images)])
    return _run_beam([(im.name, "image", synth.encode_image(im.rgb)) for im in images], expected,
                     MediaDedupConfig(near=config))


def _video_beam_agrees(videos, config) -> dict:
    from beam_jobs.media.video_near_dup import VideoNearDupIndex, fingerprint_video

    fps = [fingerprint_video(v.data, v.name, config, coords=("bench", 0, i)) for i, v in enumerate(videos)]
    return _run_beam([(v.name, "video", v.data) for v in videos], _expected(VideoNearDupIndex(config), fps),
                     MediaDedupConfig(video=config))


def _run_beam(items: list[tuple[str, str, bytes]], expected: dict, config: MediaDedupConfig) -> dict:
    """(name, modality, bytes) through MediaDedup in one pipeline; its decisions vs ``expected``."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.records import KafkaCoords
    from streams.events import RawRecord

    elements = [(KafkaCoords("bench", 0, i), RawRecord(id=name, modality=modality, source="bench", license="cc0",
                                                       data_b64=base64.b64encode(data).decode()))
                for i, (name, modality, data) in enumerate(items)]
    out_path = f"/tmp/bench_media_dedup_{time.time_ns()}.jsonl"
    t0 = time.perf_counter()
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        out = p | beam.Create(elements) | MediaDedup(config)
        kept = out["records"] | "Kept" >> beam.Map(lambda e: json.dumps([e[1].id, None]))
        dups = out["dropped"] | "Dups" >> beam.Map(lambda d: json.dumps([d[2], d[3]]))
        _ = ((kept, dups) | beam.Flatten() | beam.io.WriteToText(out_path, shard_name_template=""))
    wall = time.perf_counter() - t0
    with open(out_path) as f:
        got = dict(json.loads(line) for line in f)
    return {"records": len(items), "same_decisions": got == expected, "beam_wall_s": round(wall, 1),
            "differing": [k for k in expected if got.get(k, "?") != expected[k]][:10]}


def _videos(n: int, seed: int, beam_n: int) -> dict:
    from beam_jobs.media import video_lookalikes
    from beam_jobs.media.video_near_dup import (
        VideoNearDupConfig,
        encode_video,
        fingerprint_video,
        video_bucket_keys,
    )

    t0 = time.perf_counter()
    videos = video_lookalikes.generate(n, seed=seed)
    report = {"videos": len(videos), "distinct": n, "generate_s": round(time.perf_counter() - t0, 1), "rows": {}}
    for name, cfg in (("keyframe_phash_only", VideoNearDupConfig(frame=NearDupConfig(verify=False, colour_cell=0),
                                                                 min_local_ssim=0, max_cell_colour=1e9)),
                      ("keyframe_image_verify", VideoNearDupConfig(min_local_ssim=0, max_cell_colour=1e9)),
                      ("keyframe_verify+local", VideoNearDupConfig())):
        t0 = time.perf_counter()
        s = video_lookalikes.score(videos, cfg)
        report["rows"][name] = {
            "precision": round(s.precision, 4), "recall": round(s.recall, 4), "drops": s.drops,
            "true_drops": s.true_drops, "planted": s.planted, "false_drops": len(s.false_drops),
            "false_by_family": dict(collections.Counter(x.split("-")[0] for x, _ in s.false_drops)),
            "missed_by_edit": dict(collections.Counter(m.split("~")[1] if "~" in m else "original" for m in s.missed)),
            "ms_per_video": round(1000 * (time.perf_counter() - t0) / len(videos), 1)}
    cfg = VideoNearDupConfig()
    fp = fingerprint_video(videos[0].data, videos[0].name, cfg)
    report["fingerprint_bytes_encoded"] = len(encode_video(fp))
    report["bucket_keys_per_video"] = len(video_bucket_keys(fp, cfg))
    if beam_n:
        report["beam"] = _video_beam_agrees(videos[:beam_n], cfg)
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="distinct originals (plus planted near-dups)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--beam", type=int, default=0, help="also run the first N images through MediaDedup")
    ap.add_argument("--videos", type=int, default=0, help="distinct videos (plus planted near-dups); 0: none")
    ap.add_argument("--video-beam", type=int, default=0, help="also run the first N videos through MediaDedup")
    a = ap.parse_args(argv)
    images = generate(a.images, seed=a.seed)
    rows = {}
    for name, cfg in (("phash_only", NearDupConfig(verify=False, colour_cell=0)),
                      ("phash+verify", NearDupConfig(colour_cell=0)),
                      ("phash+colour+verify", NearDupConfig())):
        t0 = time.perf_counter()
        s = score(images, cfg)
        rows[name] = {"precision": round(s.precision, 4), "recall": round(s.recall, 4), "drops": s.drops,
                      "true_drops": s.true_drops, "planted": s.planted, "false_drops": len(s.false_drops),
                      "false_by_family": dict(collections.Counter(a.split("-")[0] for a, _ in s.false_drops)),
                      "missed_by_edit": dict(collections.Counter(m.split("~")[1] if "~" in m else "original"
                                                                 for m in s.missed)),
                      "ms_per_image": round(1000 * (time.perf_counter() - t0) / len(images), 2)}
    fp = fingerprint(images[0].rgb, images[0].name)
    report = {"images": len(images), "distinct": a.images, "seed": a.seed, "rows": rows,
              "fingerprint_bytes_encoded": len(encode(fp)),
              "fingerprint_bytes_raw": len(fp.thumb) + len(fp.colour) + len(fp.digest) + 8 + 2 + 6}
    if a.beam:
        report["beam"] = _beam_agrees(images[: a.beam], NearDupConfig())
    if a.videos:
        report["video"] = _videos(a.videos, a.seed, a.video_beam)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
