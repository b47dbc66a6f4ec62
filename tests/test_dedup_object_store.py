"""Settled dedup indexes on an object-store root (moto's S3 server, real Beam DirectRunner, the
real broker): the index lives in a local cache folder per machine, folded from every writer's
published shards, and the purge list is an object in the root. An exact copy arriving in a later
micro-batch than its original is dropped; a second worker with its own cache sees the first's
documents; a takedown reaches a cache built before it; the semantic index keeps its side files
in the cache; an unwritable cache fails the start."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from beam_jobs.dedup import semantic_settled as ss
from beam_jobs.dedup import settled
from beam_jobs.dedup.semantic import model_identity
from beam_jobs.dedup.sketch import id_hash
from beam_jobs.dedup.snapshot import DedupCacheError, index_home
from beam_jobs.ingest import run
from beam_jobs.synthetic import english_doc, raw_record
from streams import storage
from streams.mds import TailReader

sys.path.append(str(Path(__file__).resolve().parent / "helpers"))
from kafka_topics import create_topic


def published(root: str) -> set[str]:
    with TailReader(root) as reader:
        reader.poll()
        return {s["id"] for s in reader.samples(timeout_s=0)}


def dup_drops(run_dir: Path) -> list[tuple[str, str]]:
    """``(id, dup_of)`` of the documents the run's dedup dropped."""
    lines = [json.loads(line) for f in sorted((run_dir / "drops").glob("*.jsonl")) for line in f.read_text().splitlines()]
    return sorted((d["id"], d["dup_of"]) for d in lines if d.get("dup_of"))


def held(home: str) -> list[str]:
    return sorted(bytes(i).decode() for seg in settled.SettledIndex.load(home).segments for i in seg.ids)


def ingest(root: str, tmp_path: Path, lines: list[bytes], *extra: str) -> None:
    """One bounded run (one pipeline, one settlement point) into ``root``."""
    src = tmp_path / f"in-{uuid.uuid4().hex[:6]}.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    run(["--min-doc-words", "50", "--domain-template", "{language}", "--input", str(src), "--stream-root", root,
         "--no-media", *extra])


def test_an_exact_copy_in_a_later_micro_batch_is_dropped_on_an_s3_root(broker, s3_root, tmp_path, monkeypatch):
    """The Kafka micro-batch loop, two records per batch: the copy of batch 1's document in batch 2
    is dropped as its duplicate (the settled index in the default cache folder), a fresh one kept."""
    from kafka import KafkaProducer

    monkeypatch.setenv("HEADWATER_STATE_DIR", str(tmp_path / "state"))
    rng = random.Random(11)
    orig, fresh1, fresh2 = english_doc(rng), english_doc(rng), english_doc(rng)
    topic = create_topic(broker.bootstrap, "test.s3dedup", partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    for rec in (raw_record("a", orig), raw_record("b", fresh1), raw_record("a-copy", "  " + orig.upper()),
                raw_record("c", fresh2)):
        producer.send(topic, value=rec)
    producer.flush()
    producer.close()
    run_dir = tmp_path / "run"
    run(["--min-doc-words", "50", "--bootstrap", broker.bootstrap, "--topics", topic, "--stream-root", s3_root,
         "--no-control", "--no-media", "--until-caught-up", "--window-s", "1", "--batch-records", "2",
         "--run-dir", str(run_dir)])
    assert published(s3_root) == {"a", "b", "c"}
    assert dup_drops(run_dir) == [("a-copy", "a")]
    home = index_home(s3_root)
    assert home.startswith(str(tmp_path / "state" / "dedup")) and not storage.is_remote(home)
    settled.sync(s3_root)
    assert held(home) == ["a", "b", "c"]


def test_a_second_worker_with_its_own_cache_sees_the_first_workers_documents(s3_root, tmp_path):
    rng = random.Random(12)
    x, z = english_doc(rng), english_doc(rng)
    cache_a, cache_b = str(tmp_path / "cache-a"), str(tmp_path / "cache-b")
    ingest(s3_root, tmp_path, [raw_record("x", x)], "--writer-id", "wa", "--dedup-cache-dir", cache_a,
           "--run-dir", str(tmp_path / "run-a"))
    run_b = tmp_path / "run-b"
    ingest(s3_root, tmp_path, [raw_record("x-copy", x + " "), raw_record("z", z)], "--writer-id", "wb",
           "--dedup-cache-dir", cache_b, "--run-dir", str(run_b))
    assert published(s3_root) == {"x", "z"}
    assert dup_drops(run_b) == [("x-copy", "x")]
    settled.sync(s3_root, cache_dir=cache_a)
    settled.sync(s3_root, cache_dir=cache_b)
    assert held(index_home(s3_root, cache_a)) == held(index_home(s3_root, cache_b)) == ["x", "z"]
    assert index_home(s3_root, cache_a) != index_home(s3_root, cache_b)
    # the root holds no index: only its epoch (and purge lists after a takedown)
    assert [o["name"].rsplit("/", 1)[-1] for o in storage.object_root(s3_root).find("_dedup")] == ["epoch"]


def test_a_takedown_on_an_s3_root_reaches_a_cache_built_before_it(s3_root, tmp_path):
    from infra.takedown import takedown

    rng = random.Random(13)
    gone, kept = english_doc(rng), english_doc(rng)
    cache = str(tmp_path / "cache")
    args = ("--dedup-cache-dir", cache, "--run-dir", str(tmp_path / "run"))
    ingest(s3_root, tmp_path, [raw_record("x", gone, source="spam"), raw_record("y", kept)], *args)
    ingest(s3_root, tmp_path, [raw_record("z", english_doc(rng))], *args)  # its settlement point folds x and y
    home = index_home(s3_root, cache)
    assert held(home) == ["x", "y"]
    report = takedown("spam", s3_root, delete_grace_s=0)
    assert report["samples_removed"] == 1 and report["text_ids_purged"] == 1
    data = storage.object_root(s3_root).read(f"{settled.DIRNAME}/purged.npy")
    assert np.load(io.BytesIO(data)).tolist() == [id_hash("x")]
    assert settled.purge(s3_root, ["x"]) == 0  # already listed: the conditional rewrite adds nothing
    # A copy of the taken-down document is kept (its sketch left the cache), one of y is dropped as y's.
    ingest(s3_root, tmp_path, [raw_record("x2", gone + " "), raw_record("y2", kept + " ")], *args)
    assert published(s3_root) == {"y", "z", "x2"}
    assert dup_drops(tmp_path / "run") == [("y2", "y")]
    settled.sync(s3_root, cache_dir=cache)
    assert held(home) == ["x2", "y", "z"]  # y once: its rewritten shard is not refolded


def test_concurrent_purges_of_an_s3_root_lose_no_id(s3_root):
    """Purge lists are rewritten by conditional puts: racing takedowns both land."""
    ids = [[f"t{t}-{i}" for i in range(5)] for t in range(3)]
    threads = [threading.Thread(target=lambda batch=batch: [settled.purge(s3_root, [i]) for i in batch])
               for batch in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = storage.object_root(s3_root).read(f"{settled.DIRNAME}/purged.npy")
    assert np.load(io.BytesIO(data)).tolist() == sorted(id_hash(i) for batch in ids for i in batch)


def _publish(root: str, ids: list[str], first: int) -> None:
    from beam_jobs.sink import offsets_to_ranges
    from streams.events import TokenizedSample
    from streams.mds import LiveStreamWriter, sample_from_event
    from streams.vocab import Vocab

    vocab = Vocab.default()
    with LiveStreamWriter(root, writer_id="t", manifest={"vocab_version": vocab.version},
                          vocab_size=vocab.size) as w:
        rows = [sample_from_event(TokenizedSample(id=i, domain="web_en", modality="text", tokens=[11, 12], source="web",
                                                  license="cc", pipeline_version="t", language="en")) for i in ids]
        w.write_shard(rows, domain="web_en", settled=offsets_to_ranges("raw.text", 0, range(first, first + len(ids))))


def test_the_semantic_index_of_an_s3_root_lives_in_the_cache(s3_root, tmp_path):
    model = tmp_path / "m8"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"_name_or_path": "m8", "hidden_size": 8}))
    cache = str(tmp_path / "cache")
    ref = ss.sync(s3_root, horizon=100, kind="flat", model=str(model), cache_dir=cache)
    assert ref.home == index_home(s3_root, cache) and ref.root == s3_root
    vecs = np.eye(8, dtype=np.float32)[:3]
    ss.write_pending(ref.home, model=model_identity(str(model))[0], keys=["en"] * 3, ids=["d0", "d1", "d2"],
                     coordh=[0, 1, 2], vecs=vecs)
    _publish(s3_root, ["d0", "d1"], 0)  # d2 was dropped downstream: never folded
    ref = ss.sync(s3_root, horizon=100, kind="flat", model=str(model), cache_dir=cache)
    index = ref.open()
    assert sorted(bytes(i).decode() for seg in index.segments for i in seg.ids) == ["d0", "d1"]
    assert index.lookup("en", vecs[0], idh=1, coordh=99, threshold=0.9) == "d0"
    assert ss.purge(s3_root, ["d0"]) == 1
    index = ss.sync(s3_root, horizon=100, kind="flat", model=str(model), cache_dir=cache).open()
    assert sorted(bytes(i).decode() for seg in index.segments for i in seg.ids) == ["d1"]


def test_an_unwritable_dedup_cache_fails_the_start(s3_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DedupCacheError):
        index_home(s3_root, str(blocker / "cache"))
    with pytest.raises(SystemExit, match="not writable"):
        ingest(s3_root, tmp_path, [raw_record("x", "x")], "--dedup-cache-dir", str(blocker / "cache"),
               "--run-dir", str(tmp_path / "run"))
    assert index_home(str(tmp_path / "local"), str(blocker)) == str(tmp_path / "local")  # a local root: itself
    assert not os.path.exists(blocker / "cache")


def test_a_sync_with_nothing_new_keeps_its_generation(s3_root, tmp_path):
    """A settlement point with no new shard and no purge reuses the pinned generation (no snapshot
    rewrite per micro-batch): the tail's covered shards are not counted as new."""
    rng = random.Random(13)
    cache = str(tmp_path / "cache")
    ingest(s3_root, tmp_path, [raw_record("x", english_doc(rng))], "--dedup-cache-dir", cache)
    first = settled.sync(s3_root, cache_dir=cache).generation
    assert settled.sync(s3_root, cache_dir=cache).generation == first
    assert settled.sync(s3_root, cache_dir=cache).generation == first


def test_a_bounded_run_on_a_remote_runner_does_not_use_this_machines_cache(s3_root):
    """The workers of a remote runner (Dataflow, Flink, a job server) cannot read this machine's
    dedup cache, so such a run dedups within itself only (and says so), as before the cache."""
    import apache_beam as beam
    from apache_beam.runners.portability.portable_runner import PortableRunner

    from beam_jobs.pipeline import IngestConfig, IngestText
    from beam_jobs.sink import SinkConfig

    ingest_text = IngestText(IngestConfig(sink=SinkConfig(stream_root=s3_root)), streaming=False)
    assert not ingest_text._settled_here(beam.Pipeline(runner=PortableRunner()))
    assert ingest_text._settled_here(beam.Pipeline(runner="DirectRunner"))


def test_a_cache_of_a_deleted_and_recreated_root_is_emptied_not_trusted(s3_root, tmp_path):
    """Same URL, new incarnation (the root deleted and ingested again): the cache must not drop the
    re-ingested document as a copy of one that no longer exists."""
    rng = random.Random(14)
    x = english_doc(rng)
    cache = str(tmp_path / "cache")
    ingest(s3_root, tmp_path, [raw_record("x", x)], "--dedup-cache-dir", cache, "--run-dir", str(tmp_path / "r1"))
    assert published(s3_root) == {"x"}
    store = storage.object_root(s3_root)
    for obj in store.find(""):  # the root is deleted ...
        store.delete(obj["name"])
    run_2 = tmp_path / "r2"
    ingest(s3_root, tmp_path, [raw_record("x2", x)], "--dedup-cache-dir", cache, "--run-dir", str(run_2),
           "--writer-id", "w2")  # a new job (this process's writer of the old incarnation is not reused)
    assert published(s3_root) == {"x2"} and dup_drops(run_2) == []  # ... and its new incarnation keeps it
