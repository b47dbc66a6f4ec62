"""Audio tokenization RTF per core: full pipeline function vs the raw EnCodec call, same run.

    .venv/bin/python bench/bench_media_audio.py [--clips 8 --seconds 5 --bandwidth 6]

Both run single-threaded (torch threads = 1) on the same waveforms. "pipeline" is
MediaProcessor.audio on encoded OGG/Opus bytes (PyAV decode + resample + QA + chunked batched
EnCodec + vocab layout + health); "raw" is ``model.encode`` on the decoded waveform, one call per
clip. RTF here = audio seconds processed per wall second (higher is better).
"""

from __future__ import annotations

import argparse
import time

import torch

from beam_jobs.media import MediaConfig, synth
from beam_jobs.media.encodec_tokenizer import EncodecTokenizer
from streams.events import RawRecord


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bandwidth", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    proc = MediaConfig(encodec=EncodecTokenizer.Config(bandwidth=args.bandwidth, threads=1)).build()
    wavs = [synth.speechlike(args.seconds, seed=i) for i in range(args.clips)]
    items = [(RawRecord(id=f"a{i}", modality="audio", source="bench", license="cc0", data_b64="AA=="),
              synth.encode_audio(w, fmt="ogg")) for i, w in enumerate(wavs)]
    decoded = [proc.decode_audio(d)[0] for _, d in items]
    total = sum(w.size for w in decoded) / 24_000
    model = proc.encodec.model
    proc.audio(items[:1])  # warm up
    best_pipe = best_raw = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for w in decoded:
                model.encode(torch.from_numpy(w)[None, None])
        best_raw = min(best_raw, time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = proc.audio(items)
        best_pipe = min(best_pipe, time.perf_counter() - t0)
        assert all(r.sample is not None for r in results), [r.reason for r in results]
    raw_rtf, pipe_rtf = total / best_raw, total / best_pipe
    tokens = sum(r.sample["tokens"].size for r in results)
    print(f"audio: {args.clips} clips x {args.seconds:g} s at {args.bandwidth:g} kbps, 1 thread")
    print(f"raw EnCodec encode : {raw_rtf:6.1f}x realtime/core")
    print(f"pipeline function  : {pipe_rtf:6.1f}x realtime/core  ({tokens / best_pipe:,.0f} tokens/s)")
    print(f"ratio pipeline/raw : {pipe_rtf / raw_rtf:.1%}  (target >= 90%)")


if __name__ == "__main__":
    main()
