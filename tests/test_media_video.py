"""Video path: shot cuts, keyframes, audio track, <seg> interleaving, bounds and bad input."""

import numpy as np
import pytest

from beam_jobs.media import synth
from beam_jobs.media.encodec_tokenizer import FRAME_RATE, EncodecTokenizer
from beam_jobs.media.errors import MediaRejected
from beam_jobs.media.process import MediaConfig
from beam_jobs.media.video import VideoDecoder, shot_cuts
from streams.events import RawRecord
from streams.vocab import Vocab

SHOTS = [(1.5, 1), (1.0, 2), (2.0, 3)]  # cuts at 1.5 s and 2.5 s


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    art = synth.train_codebooks(tmp_path_factory.mktemp("cb"))
    return MediaConfig(image_codebooks=art, encodec=EncodecTokenizer.Config(bandwidth=1.5, threads=1)).build()


def _rec(**meta) -> RawRecord:
    return RawRecord(id="v1", modality="video", source="t", license="cc0", data_b64="AA==", meta=meta)


def test_known_shot_cuts_found():
    clip = VideoDecoder.Config(fps=4).build().decode(synth.encode_video(SHOTS))
    assert [float(clip.times[i]) for i in clip.cuts] == [1.5, 2.5]
    assert clip.keyframes[:2] == [0, clip.cuts[0]] and clip.cuts[1] in clip.keyframes
    assert clip.audio is None and clip.frames.shape[1:] == (64, 64, 3)
    assert abs(clip.duration_s - 4.5) < 0.3


def test_no_false_cuts_within_a_panning_shot():
    frames = VideoDecoder.Config(fps=6).build().decode(synth.encode_video([(3.0, 7)])).frames
    assert shot_cuts(frames, 0.5) == []


def test_video_tokens_interleave_frames_and_audio_by_time(proc):
    vocab = Vocab.default()
    audio = synth.speechlike(4.5)
    (res,) = proc.video([(_rec(caption="three shots"), synth.encode_video(SHOTS, audio=audio))])
    assert res.sample is not None, (res.reason, res.detail)
    ids = res.sample["tokens"]
    cap = vocab.encode("three shots")
    assert ids[: len(cap)].tolist() == cap and ids[len(cap)] == vocab.special("<vid>") and ids[-1] == vocab.special("</vid>")
    body = ids[len(cap) + 1 : -1]
    seg = vocab.special("<seg>")
    starts = np.flatnonzero(body == seg)
    lineage = __import__("json").loads(res.sample["lineage"])
    assert len(starts) == len(lineage["keyframe_times"]) >= 3 and lineage["shot_cuts"] == [1.5, 2.5]
    frame_ids = 4 * 256
    audio_frames = 0
    for a, b in zip(starts, [*starts[1:], body.size]):
        part = body[a + 1 : b]
        codes = vocab.ids_to_codes("video", part[:frame_ids], levels=4)
        assert codes.shape == (4, 256)
        assert part[frame_ids] == vocab.special("<aud>") and part[-1] == vocab.special("</aud>")
        audio_frames += vocab.ids_to_codes("audio", part[frame_ids + 1 : -1], levels=2).shape[1]
    assert abs(audio_frames - 4.5 * FRAME_RATE) <= 5


@pytest.mark.parametrize("data,reason", [
    (b"", "wrong_container"),
    (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100, "wrong_container"),
    ("audio_only", "no_video_stream"),
    ("truncated", "wrong_container"),  # an MP4 cut short loses its moov index: unreadable container
])
def test_bad_videos_rejected_with_reason(proc, data, reason):
    if data == "audio_only":
        data = synth.encode_audio(synth.speechlike(1.0), fmt="mp4")
    elif data == "truncated":
        data = synth.encode_video([(1.0, 1)])[:600]
    (res,) = proc.video([(_rec(), data)])
    assert res.sample is None and res.dead and res.reason == f"video:{reason}", res.reason


def test_bounds_on_frames_duration_and_dims():
    data = synth.encode_video([(2.0, 1)])
    with pytest.raises(MediaRejected) as e:
        VideoDecoder.Config(max_frames=10).build().decode(data)
    assert e.value.reason == "too_many_frames"
    with pytest.raises(MediaRejected) as e:
        VideoDecoder.Config(max_seconds=1.0).build().decode(data)
    assert e.value.reason == "too_long"
    with pytest.raises(MediaRejected) as e:
        VideoDecoder.Config(max_pixels=1000).build().decode(data)
    assert e.value.reason == "too_many_pixels"
