"""Image path: safe decode + QA, pHash near-dup, RVQ codebooks, artifact, vocab round-trip, CLI."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from beam_jobs.media import synth
from beam_jobs.media.discretizer_cli import main as discretizer_main
from beam_jobs.media.errors import MediaRejected
from beam_jobs.media.image_decode import ImageQA, decode_image
from beam_jobs.media.image_dedup import ImageDeduper
from beam_jobs.media.image_rvq import RVQImageTokenizer, psnr
from beam_jobs.media.layout import image_tokens
from streams.vocab import Vocab


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return synth.train_codebooks(tmp_path_factory.mktemp("codebooks"))


def _reencode(rgb, fmt="JPEG", **kw):
    return np.asarray(Image.open(io.BytesIO(synth.encode_image(rgb, fmt, **kw))).convert("RGB"))


def test_decode_valid_formats():
    rgb = synth.procedural_image(1)
    for fmt in ("PNG", "JPEG", "WEBP"):
        out = decode_image(synth.encode_image(rgb, fmt), ImageQA())
        assert out.shape == rgb.shape and out.dtype == np.uint8


@pytest.mark.parametrize("make,reason", [
    (lambda png: b"", "wrong_container"),
    (lambda png: b"not an image at all", "wrong_container"),
    (lambda png: png[: len(png) // 2], "corrupt"),
    (lambda png: png[: len(png) // 2] + bytes(100) + png[len(png) // 2 + 100 :], "corrupt"),
    (lambda png: synth.encode_image(np.zeros((8, 8, 3), np.uint8)), "too_small"),
    (lambda png: synth.encode_image(np.zeros((40, 400, 3), np.uint8)), "bad_aspect"),
    (lambda png: synth.encode_image(np.zeros((3000, 3000), np.uint8)), "too_many_pixels"),
    (lambda png: synth.encode_image(np.zeros((64, 64, 3), np.uint8), "PPM"), "unsupported_format"),
])
def test_bad_images_rejected_with_reason(make, reason):
    png = synth.encode_image(synth.procedural_image(2))
    with pytest.raises(MediaRejected) as e:
        decode_image(make(png), ImageQA(max_pixels=4_000_000))
    assert e.value.reason == reason


def test_decompression_bomb_rejected_from_header():
    # A 10000x10000 1-bit PNG is a few KB compressed but 100 Mpx: rejected before any pixel is decoded.
    bomb = synth.encode_image(np.zeros((10000, 10000), bool))
    with pytest.raises(MediaRejected) as e:
        decode_image(bomb, ImageQA())
    assert e.value.reason == "too_many_pixels"


def test_near_duplicates_caught_and_distinct_kept():
    dedup = ImageDeduper.Config().build()
    originals = [synth.procedural_image(100 + i, (128, 128)) for i in range(40)]
    assert all(dedup.check(im)[0] is None for im in originals), "distinct images must all be kept"
    base = originals[0]
    variants = {
        "jpeg_q40": _reencode(base, "JPEG", quality=40),
        "resized": np.asarray(Image.fromarray(base).resize((96, 96), Image.Resampling.BILINEAR)),
        "cropped": base[3:-3, 3:-3],
        "identical": base.copy(),
    }
    reasons = {name: dedup.check(im)[0] for name, im in variants.items()}
    assert reasons == {"jpeg_q40": "near_duplicate", "resized": "near_duplicate", "cropped": "near_duplicate",
                       "identical": "exact_duplicate"}


def test_rvq_reconstruction_beats_mean_colour(artifact):
    tok = RVQImageTokenizer.load(artifact)
    images = np.stack([tok.prepare(synth.procedural_image(500 + i)) for i in range(20)])  # unseen images
    codes = tok.encode(images)
    assert codes.shape == (20, 4, 256) and codes.min() >= 0 and codes.max() < 64
    rec = tok.decode(codes)
    ours = np.mean([psnr(a, b) for a, b in zip(images, rec)])
    base = np.mean([psnr(a, np.broadcast_to(a.reshape(-1, 3).mean(0), a.shape)) for a in images])
    assert ours > base + 6, (ours, base)
    # more levels -> better reconstruction (residual property)
    fewer = tok.decode(codes[:, :2])
    assert np.mean([psnr(a, b) for a, b in zip(images, fewer)]) < ours


def test_artifact_is_versioned_and_tamper_checked(artifact, tmp_path):
    tok = RVQImageTokenizer.load(artifact)
    assert tok.name.startswith("image-rvq-") and artifact.endswith(tok.name)
    meta = json.loads((tok_dir := __import__("pathlib").Path(artifact)).joinpath("meta.json").read_text())
    assert meta["version"] == tok.version and meta["config"]["levels"] == 4
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "rq.faiss").write_bytes((tok_dir / "rq.faiss").read_bytes())
    (bad / "meta.json").write_text(json.dumps({**meta, "version": "000000000000"}))
    with pytest.raises(ValueError, match="does not match|!="):
        RVQImageTokenizer.load(bad)


def test_codes_round_trip_through_vocab(artifact):
    vocab = Vocab.default()
    tok = RVQImageTokenizer.load(artifact)
    codes = tok.encode(tok.prepare(synth.procedural_image(7))[None])[0]
    ids = image_tokens(vocab, codes, caption="a red disc")
    assert ids.dtype == np.int32
    caption = vocab.encode("a red disc")
    assert ids[: len(caption)].tolist() == caption
    assert ids[len(caption)] == vocab.special("<img>") and ids[-1] == vocab.special("</img>")
    body = ids[len(caption) + 1 : -1]
    assert body.size == codes.size
    assert all(vocab.locate(i)[0] == "image" for i in body[:50])
    assert np.array_equal(vocab.ids_to_codes("image", body, levels=codes.shape[0]), codes)
    # frame-major, levels interleaved: position 0's levels come first
    assert [vocab.locate(i)[1] for i in body[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_discretizer_cli_trains_artifact(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.png").write_bytes(synth.encode_image(synth.procedural_image(900 + i)))
    (src / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    rc = discretizer_main(["train", "--modality", "image", "--input", str(src), "--out", str(tmp_path / "art"),
                           "--levels", "2", "--nbits", "5", "--grid", "8", "--side", "32", "--iters", "10"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["name"].startswith("image-rvq-") and report["train_images"] == 30
    assert report["psnr_db"] > report["baseline_mean_colour_psnr_db"]
    assert report["min_utilization"] >= 0.8
    assert RVQImageTokenizer.load(report["artifact"]).version == report["name"].split("-")[-1]
    assert discretizer_main(["train", "--modality", "audio", "--input", str(src), "--out", str(tmp_path)]) == 2
