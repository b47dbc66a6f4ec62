"""Dedup state across restarts, workers and takedowns: the persisted FAISS index of the semantic
snapshot (loaded, or rebuilt with a log line when missing, corrupt or of other vectors), two
real processes folding one root at once, and a takedown purging the text near-dup index."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np

from beam_jobs.dedup import semantic_settled as ss
from beam_jobs.dedup import settled
from beam_jobs.dedup.semantic import model_identity
from beam_jobs.dedup.semantic_settled import (
    ANN,
    DIRNAME,
    PENDING,
    SemanticSettledIndex,
    sync,
    write_pending,
)
from beam_jobs.dedup.sketch import id_hash

ROOT = str(Path(__file__).resolve().parent.parent)


def _model(tmp_path: Path, name: str, dim: int) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_name_or_path": name, "hidden_size": dim}))
    return str(path)


def _publish(root: str, ids: list[str], first: int, *, writer: str = "t", source: str = "web") -> None:
    from beam_jobs.sink import offsets_to_ranges
    from streams.events import TokenizedSample
    from streams.mds import LiveStreamWriter, sample_from_event
    from streams.vocab import Vocab

    vocab = Vocab.default()
    w = LiveStreamWriter(root, writer_id=writer, manifest={"vocab_version": vocab.version}, vocab_size=vocab.size,
                         durable=False)
    rows = [sample_from_event(TokenizedSample(id=i, domain="web_en", modality="text", tokens=[11, 12], source=source,
                                              license="cc", pipeline_version="t", language="en")) for i in ids]
    w.write_shard(rows, domain="web_en", settled=offsets_to_ranges("raw.text", 0, range(first, first + len(ids))))


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _batch(root: str, model: str, ids: list[str], vecs: np.ndarray, first: int, *, writer: str = "t") -> None:
    write_pending(root, model=model_identity(model)[0], keys=["en"] * len(ids), ids=ids,
                  coordh=list(range(first, first + len(ids))), vecs=vecs)
    _publish(root, ids, first, writer=writer)


def _restart() -> None:
    """What a new process sees: nothing of the last one's in memory."""
    ss._OPEN.clear()


def _ann_meta(root: str) -> dict:
    (name,) = os.listdir(os.path.join(root, DIRNAME, ANN))
    with np.load(os.path.join(root, DIRNAME, ANN, name)) as z:
        return json.loads(z["meta"].tobytes())


def _rebuilt(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage() or "building it" in r.getMessage()]


def test_hnsw_index_is_persisted_and_a_restart_loads_it_plus_the_tail(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="beam_jobs.dedup.semantic_settled")
    root, model = str(tmp_path / "root"), _model(tmp_path, "m16", 16)
    vecs = _unit(90, 16)
    _batch(root, model, [f"a{i}" for i in range(60)], vecs[:60], 0)
    index = sync(root, horizon=1000, kind="hnsw", model=model).open()
    assert index.lookup("en", vecs[7], idh=1, coordh=1, threshold=0.99) == "a7"  # builds, then persists
    assert len(_rebuilt(caplog)) == 1 and "no persisted hnsw index" in _rebuilt(caplog)[0]
    assert _ann_meta(root)["rows"] == 60

    # In process: the next generation extends the built index with the tail and persists it.
    _batch(root, model, [f"a{i}" for i in range(60, 75)], vecs[60:75], 60)
    index = sync(root, horizon=1000, kind="hnsw", model=model).open()
    assert _ann_meta(root)["rows"] == 75 and len(_ann_meta(root)["segments"]) == 2

    # A restart after a publish with no snapshot (kill -9): the persisted index plus the tail's rows.
    _batch(root, model, [f"a{i}" for i in range(75, 90)], vecs[75:90], 75)
    _restart()
    caplog.clear()
    index = sync(root, horizon=1000, kind="hnsw", model=model).open()
    assert index.lookup("en", vecs[80], idh=1, coordh=1, threshold=0.99) == "a80"  # a tail row
    assert index.lookup("en", vecs[3], idh=1, coordh=1, threshold=0.99) == "a3"
    assert index.lookup("en", vecs[3], idh=id_hash("a3"), coordh=1, threshold=0.99) is None  # never itself
    assert _rebuilt(caplog) == []  # loaded, not rebuilt
    assert _ann_meta(root)["rows"] == 90  # grew by the tail: persisted again

    # Compaction (horizon) rewrites the segments: the stale file is removed, the next lookup rebuilds.
    _batch(root, model, ["b0"], _unit(1, 16, seed=5), 90)
    index = sync(root, horizon=50, kind="hnsw", model=model).open()
    assert not os.listdir(os.path.join(root, DIRNAME, ANN))
    caplog.clear()
    assert index.lookup("en", vecs[85], idh=1, coordh=1, threshold=0.99) == "a85"
    assert len(_rebuilt(caplog)) == 1 and _ann_meta(root)["rows"] == len(index)


def test_a_corrupt_foreign_or_mismatched_index_file_is_rebuilt_with_a_log_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="beam_jobs.dedup.semantic_settled")
    model = _model(tmp_path, "m8", 8)
    roots = [str(tmp_path / "r1"), str(tmp_path / "r2")]
    for seed, root in enumerate(roots):  # same ids and segment names, other vectors
        _batch(root, model, [f"d{i}" for i in range(30)], _unit(30, 8, seed=seed), 0)
        sync(root, horizon=1000, kind="hnsw", model=model).open().key_index("en")
    path = os.path.join(roots[0], DIRNAME, ANN, os.listdir(os.path.join(roots[0], DIRNAME, ANN))[0])
    good = Path(path).read_bytes()
    vecs = _unit(30, 8, seed=0)

    def reopen() -> list[str]:
        _restart()
        caplog.clear()
        index = SemanticSettledIndex.load(roots[0], "hnsw")
        assert index.lookup("en", vecs[4], idh=1, coordh=1, threshold=0.99) == "d4"  # right answers regardless
        return _rebuilt(caplog)

    assert reopen() == []
    Path(path).write_bytes(good[: len(good) // 2])  # torn file
    assert "unreadable" in reopen()[0]
    assert Path(path).read_bytes() != good[: len(good) // 2] and reopen() == []  # rewritten whole
    other = os.path.join(roots[1], DIRNAME, ANN, os.path.basename(path))
    Path(path).write_bytes(Path(other).read_bytes())  # another root's index over the same ids and names
    assert "does not match the snapshot's vectors" in reopen()[0]
    # another model of the same dimension (the snapshot is read as the model it records)
    with open(os.path.join(roots[0], DIRNAME, "snapshot.json")) as f:
        snap = json.load(f)
    snap["model"] = "other@123"
    with open(os.path.join(roots[0], DIRNAME, "snapshot.json"), "w") as f:
        json.dump(snap, f)
    assert "another model, kind or generation" in reopen()[0]


_FOLDER = r"""
import os, sys, time
import numpy as np
sys.path.insert(0, sys.argv[5])
from test_dedup_state_persist import _batch, _unit
from beam_jobs.dedup.semantic_settled import sync
root, model, worker, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
while not os.path.exists(os.path.join(root, "go")):
    time.sleep(0.01)
for b in range(batches):
    ids = [f"w{worker}-{b}-{i}" for i in range(4)]
    first = (worker * batches + b) * 4
    _batch(root, model, ids, _unit(4, 8, seed=first + 1), first, writer=f"w{worker}")  # one writer id each
    sync(root, horizon=10**6, kind="flat", model=model, max_segments=6)
"""


def test_two_processes_folding_one_root_at_once_lose_nothing(tmp_path):
    root, model, batches = str(tmp_path / "root"), _model(tmp_path, "m8", 8), 12
    os.makedirs(root)
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", _FOLDER, root, model, str(w), str(batches),
                               str(Path(__file__).parent)], env=env, stderr=subprocess.PIPE, text=True)
             for w in range(2)]
    Path(root, "go").touch()
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    ref = sync(root, horizon=10**6, kind="flat", model=model)
    _restart()
    index = SemanticSettledIndex.load(root, model=model_identity(model))
    assert index.generation == ref.generation and not index.reset
    held = sorted(bytes(i).decode() for seg in index.segments for i in seg.ids)
    assert held == sorted(f"w{w}-{b}-{i}" for w in range(2) for b in range(batches) for i in range(4))
    assert os.listdir(os.path.join(root, DIRNAME, PENDING)) == []
    assert not [n for n in os.listdir(os.path.join(root, DIRNAME)) if n.startswith("seg-") and n not in
                {os.path.basename(s.path) for s in index.segments}]  # nothing left half-written or orphaned


def _near_dup(text: str) -> str:
    return text + " Indeed."


def test_takedown_purges_the_text_near_dup_index_end_to_end(tmp_path):
    from beam_jobs.ingest import run
    from beam_jobs.synthetic import english_doc, raw_record
    from infra.takedown import takedown

    def ingest(lines: list[bytes]) -> dict:
        src = tmp_path / f"in-{uuid.uuid4().hex[:6]}.jsonl"
        src.write_bytes(b"".join(line + b"\n" for line in lines))
        return run(["--min-doc-words", "50", "--domain-template", "{language}", "--input", str(src),
                    "--stream-root", str(tmp_path / "s")])

    def published() -> set[str]:
        from streams.mds import TailReader

        with TailReader(str(tmp_path / "s")) as reader:
            reader.poll()
            return {s["id"] for s in reader.samples(timeout_s=0)}

    rng = random.Random(7)
    gone_text, kept_text = english_doc(rng), english_doc(rng)
    ingest([raw_record("x", gone_text, source="spam"), raw_record("y", kept_text, source="web")])
    ingest([raw_record("z", english_doc(rng), source="web")])  # its settlement point folds x and y
    assert published() == {"x", "y", "z"}
    assert {bytes(i).decode() for seg in settled.SettledIndex.load(str(tmp_path / "s")).segments
            for i in seg.ids} == {"x", "y"}
    report = takedown("spam", str(tmp_path / "s"))
    assert report["samples_removed"] == 1 and report["text_ids_purged"] == 1
    # Later, near-duplicates of both from a source still allowed: the one of the taken-down
    # document is kept (its sketch left the index), the one of y is still dropped as y's.
    ingest([raw_record("x2", _near_dup(gone_text), source="web"), raw_record("y2", _near_dup(kept_text), source="web")])
    ingest([])  # a settlement point after it: the index agrees with what was published
    drops = [json.loads(line) for f in sorted((tmp_path / "s" / "_ingest" / "drops").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    assert published() == {"y", "z", "x2"}
    assert [(d["id"], d["dup_of"]) for d in drops if d.get("dup_of")] == [("y2", "y")]
    index = settled.SettledIndex.load(str(tmp_path / "s"))
    held = [bytes(i).decode() for seg in index.segments for i in seg.ids]
    assert sorted(held) == ["x2", "y", "z"]  # no trace of x on disk; y once (its rewritten shard is not refolded)


def test_text_purge_rewrites_only_the_segments_holding_the_documents(tmp_path):
    from beam_jobs.dedup.record import DedupRecord
    from beam_jobs.dedup.sketch import Sketch

    root = str(tmp_path / "root")
    ddir = os.path.join(root, settled.DIRNAME)
    os.makedirs(ddir)
    recs = [(f"d{i}", DedupRecord(Sketch(id_hash(f"d{i}"), i, 0, 3, 0, b"\x01" * 8), [i] * 9, 1000 + i))
            for i in range(6)]
    segs = [settled.Segment.build(os.path.join(ddir, f"seg-{g:08d}"), recs[g * 3:g * 3 + 3], 100.0 + g)
            for g in range(2)]
    from beam_jobs.dedup.snapshot import write_snapshot

    write_snapshot(ddir, 2, segs, [], 102.0)
    assert settled.purge(root, ["d4", "zz"]) == 2 and settled.purge(root, ["d4"]) == 0
    index = settled.sync(root).open()
    assert index.generation == 3 and index.segments[0].path == segs[0].path  # untouched
    assert [len(s) for s in index.segments] == [3, 2] and index.segments[1].created == 101.0
    assert index.lookup(idh=9, coordh=99, exact=1004, bands=None, shingles=None, threshold=0.8) is None
    assert index.lookup(idh=9, coordh=99, exact=1005, bands=None, shingles=None, threshold=0.8)[1] == "d5"
    assert settled.sync(root).generation == 3  # nothing more to purge: no new generation
