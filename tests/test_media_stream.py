"""Media samples written to a live MDS stream and read back with the stock StreamingDataset."""

import numpy as np
from streaming import StreamingDataset

from beam_jobs.media import MediaConfig, synth
from beam_jobs.media.encodec_tokenizer import EncodecTokenizer
from streams.events import RawRecord
from streams.mds import LiveStreamWriter, read_sidecar
from streams.vocab import Vocab


def _rec(rid, modality, **meta):
    return RawRecord(id=rid, modality=modality, source="t", license="cc0", data_b64="AA==", meta=meta)


def _spans(vocab, ids):
    """[(modality, level-set)] of media ids between the open/close specials, in order."""
    opens = {vocab.special(t): t for t in ("<img>", "<aud>", "<vid>")}
    out = []
    for i in ids:
        if int(i) in opens:
            out.append((opens[int(i)], set()))
        else:
            kind, level = vocab.locate(int(i))
            if level is not None:
                out[-1][1].add((kind, level))
    return out


def test_media_samples_round_trip_through_streaming_dataset(tmp_path):
    vocab = Vocab.default()
    art = synth.train_codebooks(tmp_path / "cb")
    proc = MediaConfig(image_codebooks=art, encodec=EncodecTokenizer.Config(bandwidth=1.5, threads=1)).build()
    results = (
        proc.image([(_rec("i1", "image", caption="a picture"), synth.encode_image(synth.procedural_image(1)))])
        + proc.audio([(_rec("a1", "audio"), synth.encode_audio(synth.speechlike(0.6)))])
        + proc.video([(_rec("v1", "video"), synth.encode_video([(1.0, 2), (1.0, 3)], audio=synth.speechlike(2.0)))])
    )
    samples = [r.sample for r in results]
    assert all(s is not None for s in samples), [r.reason for r in results]
    manifest = {"vocab_version": vocab.version, "pipeline_version": proc.config.pipeline_version, **proc.manifest()}
    with LiveStreamWriter(tmp_path / "stream", writer_id="media-test", manifest=manifest, vocab_size=vocab.size) as w:
        for s in samples:  # default domain = modality; one shard per domain
            w.write_shard([s], domain=s["domain"])
    shards = read_sidecar(str(tmp_path / "stream"))["shards"].values()
    assert {e["manifest"]["discretizer_version"] for e in shards} == {proc.manifest()["discretizer_version"]}
    assert "image-rvq-" in proc.manifest()["discretizer_version"]
    ds = StreamingDataset(remote=str(tmp_path / "stream"), local=str(tmp_path / "cache"), shuffle=False, batch_size=1)
    got = {row["id"]: row for row in ds}
    assert set(got) == {"i1", "a1", "v1"}
    for s in samples:
        assert np.array_equal(got[s["id"]]["tokens"], s["tokens"])
    assert _spans(vocab, got["i1"]["tokens"]) == [("<img>", {("image", lv) for lv in range(4)})]
    assert _spans(vocab, got["a1"]["tokens"]) == [("<aud>", {("audio", 0), ("audio", 1)})]
    vid = _spans(vocab, got["v1"]["tokens"])
    assert vid[0][0] == "<vid>" and ("video", 3) in vid[0][1] and [k for k, _ in vid[1:]] == ["<aud>"] * (len(vid) - 1)
