"""Audio path: PyAV decode/resample, QA, frame-aligned chunking, batched EnCodec, vocab layout."""

import numpy as np
import pytest

from beam_jobs.media import synth
from beam_jobs.media.audio_qa import AudioQA, audio_stats
from beam_jobs.media.av_decode import decode_audio, open_container
from beam_jobs.media.encodec_tokenizer import FRAME_RATE, EncodecTokenizer
from beam_jobs.media.errors import MediaRejected
from beam_jobs.media.layout import audio_tokens
from beam_jobs.media.process import MediaConfig
from beam_jobs.media.uri import UriPolicy
from streams.events import RawRecord
from streams.vocab import Vocab


@pytest.fixture(scope="module")
def tok():
    return EncodecTokenizer.Config(bandwidth=6.0, chunk_seconds=0.5, batch_size=4, threads=1).build()


@pytest.fixture(scope="module")
def proc():
    return MediaConfig(encodec=EncodecTokenizer.Config(bandwidth=3.0, threads=1), uri=UriPolicy()).build()


def _decode(data: bytes) -> np.ndarray:
    with open_container(data) as c:
        return decode_audio(c, rate=24_000, max_seconds=60)


@pytest.mark.parametrize("fmt", ["wav", "ogg", "mp4"])
def test_decode_resamples_any_container_to_24k_mono(fmt):
    wav = synth.speechlike(1.0, rate=16_000)
    out = _decode(synth.encode_audio(wav, rate=16_000, fmt=fmt))
    assert out.dtype == np.float32 and abs(out.size - 24_000) < 2_500
    assert AudioQA().check(audio_stats(out, 24_000)) is None


def test_qa_reasons():
    qa, r = AudioQA(), 24_000
    speech = synth.speechlike(1.0)
    cases = {
        "too_short": speech[: r // 10],
        "silence": np.zeros(r, np.float32),
        "clipping": np.clip(speech * 20, -1, 1),
        "low_activity": np.random.default_rng(0).standard_normal(r).astype(np.float32) * 0.1,
        # loud for 8% of the time: active enough, but the 90th-percentile level is the noise floor
        "low_snr": np.random.default_rng(0).standard_normal(r).astype(np.float32) * 0.1
        + np.where(np.arange(r) < 0.08 * r, speech * 2, 0).astype(np.float32),
    }
    for reason, wav in cases.items():
        assert qa.check(audio_stats(wav, r)) == reason, reason
    assert qa.check(audio_stats(speech, r)) is None


def test_codes_shape_levels_and_chunking_is_frame_aligned(tok):
    wav = synth.speechlike(1.3)
    codes = tok.encode(wav)
    assert codes.shape == (8, tok.frames_for(wav.size)) and codes.shape[1] == round(1.3 * FRAME_RATE)
    assert codes.min() >= 0 and codes.max() < 1024
    # chunks of 0.5 s = 37 whole frames; the first chunk equals an unchunked encode of it
    whole = EncodecTokenizer.Config(bandwidth=6.0, chunk_seconds=60, threads=1).build().encode(wav)
    first = tok.chunk // 320
    assert tok.chunk % 320 == 0 and np.array_equal(codes[:, :first], whole[:, :first])
    assert len({len(np.unique(row)) for row in codes}) > 0 and len(np.unique(codes[0])) > 5


def test_batched_encode_equals_one_by_one(tok):
    wavs = [synth.speechlike(s, seed=i) for i, s in enumerate((0.4, 1.1, 0.7))]
    batched = tok.encode_many(wavs)
    for wav, codes in zip(wavs, batched):
        assert np.array_equal(codes, tok.encode(wav))


def test_bandwidth_sets_levels_and_version_names_weights():
    t = EncodecTokenizer.Config(bandwidth=1.5, threads=1).build()
    assert t.levels == 2 and t.encode(synth.speechlike(0.2)).shape[0] == 2
    assert t.version == "encodec_24khz-1.5kbps-random-seed0"
    with pytest.raises(ValueError, match="bandwidth"):
        EncodecTokenizer.Config(bandwidth=5.0).build()
    with pytest.raises(FileNotFoundError):
        EncodecTokenizer.Config(checkpoint="/nonexistent/encodec.th").build()


def test_checkpoint_path_loads_same_weights(tmp_path, tok):
    import torch

    path = tmp_path / "encodec.th"
    torch.save(tok.model.state_dict(), path)
    loaded = EncodecTokenizer.Config(bandwidth=6.0, checkpoint=str(path), chunk_seconds=0.5, threads=1).build()
    wav = synth.speechlike(0.5, seed=3)
    assert np.array_equal(loaded.encode(wav), tok.encode(wav)) and loaded.version.startswith("encodec_24khz-6kbps-ckpt-")


def test_process_audio_tokens_round_trip_through_vocab(proc):
    vocab = Vocab.default()
    wav = synth.speechlike(1.0, seed=5)
    rec = RawRecord(id="a1", modality="audio", source="t", license="cc0", data_b64="AA==", meta={"caption": "hi"})
    (res,) = proc.audio([(rec, synth.encode_audio(wav, fmt="ogg"))])
    assert res.reason is None, res.detail
    ids = res.sample["tokens"]
    cap = vocab.encode("hi")
    assert ids.dtype == np.int32 and ids[: len(cap)].tolist() == cap
    assert ids[len(cap)] == vocab.special("<aud>") and ids[-1] == vocab.special("</aud>")
    codes = vocab.ids_to_codes("audio", ids[len(cap) + 1 : -1], levels=4)
    assert np.array_equal(codes, proc.encodec.encode(proc.decode_audio(synth.encode_audio(wav, fmt="ogg"))[0]))
    assert np.array_equal(audio_tokens(vocab, codes, "hi"), ids)


def test_espeak_speech_is_tokenized(proc):
    data = synth.espeak_wav("the quick brown fox jumps over the lazy dog")
    if data is None:
        pytest.skip("espeak-ng not installed")
    rec = RawRecord(id="s1", modality="audio", source="t", license="cc0", data_b64="AA==")
    (res,) = proc.audio([(rec, data)])
    assert res.sample is not None, res.reason
    assert len(res.sample["tokens"]) > 4 * FRAME_RATE  # > 1 s of 4-level frames


@pytest.mark.parametrize("data,reason", [
    (b"", "wrong_container"),
    (b"RIFF\x00\x00\x00\x00WAVEjunkjunk", "wrong_container"),
    (b"\x00" * 5000, "wrong_container"),
])
def test_bad_audio_rejected(proc, data, reason):
    rec = RawRecord(id="b", modality="audio", source="t", license="cc0", data_b64="AA==")
    (res,) = proc.audio([(rec, data)])
    assert res.sample is None and res.reason == f"audio:{reason}" and res.dead


def test_truncated_and_imageonly_audio_rejected(proc):
    rec = RawRecord(id="b", modality="audio", source="t", license="cc0", data_b64="AA==")
    ogg = synth.encode_audio(synth.speechlike(1.0), fmt="ogg")
    png = synth.encode_image(synth.procedural_image(1))
    results = proc.audio([(rec, ogg[:300]), (rec, png), (rec, ogg)])
    assert [r.sample is not None for r in results] == [False, False, True]  # valid neighbour kept
    assert all(r.reason and r.reason.startswith("audio:") for r in results[:2]), [r.reason for r in results]
    with pytest.raises(MediaRejected):
        proc.decode_audio(ogg[:300])
