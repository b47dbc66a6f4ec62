"""Video tokenization throughput: media seconds processed per wall second.

    .venv/bin/python bench/bench_media_video.py [--seconds 20]

A procedural 96x64 MP4 (mpeg4 + AAC) with a shot cut every 2.5 s goes through
MediaProcessor.video: decode, 2 fps resampling, shot cuts, keyframes through small image RVQ
codebooks, the audio track through EnCodec (1.5 kbps), <seg> interleaving. Single thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import faiss
import torch

from beam_jobs.media import MediaConfig, synth
from beam_jobs.media.encodec_tokenizer import EncodecTokenizer
from beam_jobs.media.process import MediaProcessor
from streams.events import RawRecord


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    shots = [(2.5, i) for i in range(int(args.seconds / 2.5))]
    data = synth.encode_video(shots, audio=synth.speechlike(args.seconds))
    rec = RawRecord(id="v", modality="video", source="bench", license="cc0", data_b64="AA==")
    with tempfile.TemporaryDirectory() as root:
        art = synth.train_codebooks(root, levels=8, nbits=8, n_images=200)
        proc: MediaProcessor = MediaConfig(image_codebooks=art, encodec=EncodecTokenizer.Config(bandwidth=1.5, threads=1)).build()
        proc.video([(rec, data)])
        t0 = time.perf_counter()
        (res,) = proc.video([(rec, data)])
        dt = time.perf_counter() - t0
        no_audio = synth.encode_video(shots)
        t0 = time.perf_counter()
        proc.video([(rec, no_audio)])
        dt_v = time.perf_counter() - t0
    assert res.sample is not None, res.reason
    print(f"video: {args.seconds:g} s, {len(shots)} shots, 1 thread, {res.sample['tokens'].size} tokens")
    print(f"with audio   : {args.seconds / dt:6.1f} media seconds/s")
    print(f"frames only  : {args.seconds / dt_v:6.1f} media seconds/s")


if __name__ == "__main__":
    main()
