"""End-to-end ingest: bounded files and streaming Kafka (real tansu broker) into a live MDS stream
read back with a stock ``streaming.StreamingDataset``; kill -9 fault injection; fuzzed input."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beam_jobs.ingest import run
from beam_jobs.synthetic import edit_words, english_doc, raw_record
from beam_jobs.validate import Invalid, ValidateConfig, decode_record

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests" / "helpers"))
from kafka_topics import create_topic


def corpus(n_unique: int, seed: int = 0) -> tuple[list[tuple[str, bytes]], set[str], dict[str, str]]:
    """(cluster key, record) pairs in order, the ids that must survive, and their texts.

    Every duplicate follows its original within the same cluster key (so a Kafka
    producer keyed by cluster keeps their order), plus bad and filtered records.
    """
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    keep: dict[str, str] = {}
    for i in range(n_unique):
        text = english_doc(rng)
        out.append((f"c{i}", raw_record(f"u{i}", text, source="web" if i % 3 else "books")))
        keep[f"u{i}"] = text
        if i % 5 == 0:
            out.append((f"c{i}", raw_record(f"u{i}-exact", "  " + text.upper() + "  ")))
        if i % 7 == 0:
            out.append((f"c{i}", raw_record(f"u{i}-near", edit_words(rng, text, 0.01))))
    bad = [b'{"id": "x"', b"\xff\xfe\xfd", b'{"id":"m","modality":"smell","source":"s","license":"l","text":"t"}',
           raw_record("short", "Too short."), raw_record("toxic", english_doc(rng) + " Fuck you, stupid idiot moron loser.")]
    for j, b in enumerate(bad):
        out.insert(3 + 4 * j, (f"bad{j}", b))
    return out, set(keep), keep


def stream_samples(root: str) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=root, batch_size=1, shuffle=False)
    return [ds[i] for i in range(len(ds))]


def decoded(samples: list[dict]) -> dict[str, str]:
    from streams.vocab import Vocab

    vocab = Vocab.default()
    return {s["id"]: vocab.decode([int(t) for t in s["tokens"][:-1]]) for s in samples}


def write_jsonl(path: Path, records: list[tuple[str, bytes]]) -> str:
    path.write_bytes(b"".join(r + b"\n" for _, r in records))
    return str(path)


def _args(*extra: str) -> list[str]:
    return ["--min-doc-words", "50", *extra]


def test_bounded_ingest_writes_exactly_the_unique_clean_docs(tmp_path):
    records, expected_ids, texts = corpus(40)
    src = write_jsonl(tmp_path / "in.jsonl", records)
    summary = run(_args("--input", src, "--stream-root", str(tmp_path / "s"), "--dlq", str(tmp_path / "dlq")))
    samples = stream_samples(str(tmp_path / "s"))
    assert sorted(s["id"] for s in samples) == sorted(expected_ids)
    assert decoded(samples) == texts
    assert {s["domain"] for s in samples} == {"web_en", "books_en"}
    dead = [json.loads(line) for f in (tmp_path / "dlq").iterdir() for line in f.read_text().splitlines()]
    assert sorted(d["reason"] for d in dead) == ["invalid_utf8", "malformed_json", "unknown_modality"]
    assert summary["dead_letters"] == 3 and summary["samples_written"] == len(expected_ids)
    assert summary["dup_rate"] > 0 and summary["language_share"] == {"en": 1.0}
    assert summary["stages"]["filter.toxicity"]["drop_toxic"] == 1
    assert summary["stages"]["filter.c4_quality"]["drop_too_few_sentences"] == 1
    assert json.loads((tmp_path / "s" / "_ingest" / "metrics.json").read_text())["samples_written"] == len(expected_ids)
    # A re-run of the same backfill settles nothing new and writes nothing.
    again = run(_args("--input", src, "--stream-root", str(tmp_path / "s"), "--dlq", str(tmp_path / "dlq")))
    assert again["records_in"] == 0 and len(stream_samples(str(tmp_path / "s"))) == len(expected_ids)


def test_bounded_reads_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    rows = [{"id": f"p{i}", "modality": "text", "source": "web", "license": "cc", "text": english_doc(rng)} for i in range(3)]
    rows.append({"id": "bad", "modality": "text", "source": "web", "license": "cc", "text": None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    run(_args("--input", str(tmp_path / "in.parquet"), "--stream-root", str(tmp_path / "s")))
    assert sorted(s["id"] for s in stream_samples(str(tmp_path / "s"))) == ["p0", "p1", "p2"]
    (dlq,) = (tmp_path / "s" / "_ingest" / "dlq").iterdir()
    assert json.loads(dlq.read_text())["reason"] == "payload_fields"


def _produce_aiokafka(bootstrap: str, topic: str, records: list[tuple[str, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    async def go():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in records:
                await producer.send(topic, value=value, key=key.encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(go())


def test_streaming_ingest_matches_bounded(broker, tmp_path):
    records, expected_ids, texts = corpus(30, seed=1)
    topic = create_topic(broker.bootstrap, "test.ingest")
    _produce_aiokafka(broker.bootstrap, topic, records)
    summary = run(_args("--bootstrap", broker.bootstrap, "--topics", topic, "--stream-root", str(tmp_path / "live"),
                        "--until-caught-up", "--window-s", "1"))
    live = stream_samples(str(tmp_path / "live"))
    assert sorted(s["id"] for s in live) == sorted(expected_ids)
    assert decoded(live) == texts
    assert summary["dead_letters"] == 3
    run(_args("--input", write_jsonl(tmp_path / "in.jsonl", records), "--stream-root", str(tmp_path / "batch")))
    content = lambda samples: sorted((s["id"], s["domain"], s["language"], s["tokens"].tolist()) for s in samples)
    assert content(live) == content(stream_samples(str(tmp_path / "batch")))
    _assert_dlq_topic_has(broker.bootstrap, topic, {"invalid_utf8", "malformed_json", "unknown_modality"})


def _assert_dlq_topic_has(bootstrap: str, topic: str, reasons: set[str]) -> None:
    from kafka import TopicPartition

    from streams.kafka import KafkaSettings, make_consumer, poll_records

    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=[TopicPartition("dlq", 0)])
    try:
        consumer.seek_to_beginning()
        seen: set[str] = set()
        for rec in poll_records(consumer, timeout_s=10, until=lambda _: reasons <= seen):
            event = json.loads(rec.value)
            if event.get("topic") == topic:
                seen.add(event["reason"])
        assert reasons <= seen
    finally:
        consumer.close()


def _kill_trial(bootstrap: str, tmp_path: Path, seed: int) -> tuple[str, Path, dict[str, str]]:
    """Run streaming ingest as a subprocess, SIGKILL it at a random moment, restart to completion.

    Returns the topic, the stream root and the kept texts."""
    rng = random.Random(seed)
    records, expected_ids, texts = corpus(60, seed=seed)
    topic = create_topic(bootstrap, "test.ingest")
    _produce_aiokafka(bootstrap, topic, records)
    root = tmp_path / f"live{seed}"
    cmd = [sys.executable, "-m", "infra.cli", "ingest", *_args("--bootstrap", bootstrap, "--topics", topic,
                                                               "--stream-root", str(root), "--until-caught-up")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt < 2:
            time.sleep(rng.uniform(2.0, 9.0))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
        break
    samples = stream_samples(str(root))
    ids = [s["id"] for s in samples]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert set(ids) == expected_ids, f"lost {expected_ids - set(ids)} after {kills} kills"
    _assert_dedup_index_agrees(str(root), samples)
    return topic, root, texts


def _assert_dedup_index_agrees(root: str, samples: list[dict]) -> None:
    """The settled dedup index (snapshot + tail, as a restart loads it) holds exactly the published
    text documents, and no two published documents are near-duplicates."""
    from beam_jobs.dedup.settled import ID_BYTES, SettledIndex, sync
    from beam_jobs.synthetic import true_jaccard

    sync(root)
    index = SettledIndex.load(root)
    indexed = sorted(i.decode() for seg in index.segments for i in seg.ids)
    assert indexed == sorted(s["id"].encode()[:ID_BYTES].decode() for s in samples if s["modality"] == "text")
    texts = list(decoded(samples).values())
    assert not [(a, b) for i, a in enumerate(texts) for b in texts[i + 1:] if true_jaccard(a, b) >= 0.8]


def test_kill9_streaming_exactly_once(broker, tmp_path):
    topic, root, texts = _kill_trial(broker.bootstrap, tmp_path, seed=100)
    # A later run restarts from the dedup snapshot + tail: near-dups of published docs stay out.
    rng = random.Random(7)
    published = sorted(texts)[:6]
    wave = [(f"n{i}", raw_record(f"{doc_id}-again", edit_words(rng, texts[doc_id], 0.01)))
            for i, doc_id in enumerate(published)] + [("new", raw_record("fresh", english_doc(rng)))]
    _produce_aiokafka(broker.bootstrap, topic, wave)
    run(_args("--bootstrap", broker.bootstrap, "--topics", topic, "--stream-root", str(root), "--until-caught-up",
              "--window-s", "1", "--no-control"))
    ids = {s["id"] for s in stream_samples(str(root))}
    assert ids == set(texts) | {"fresh"}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [101, 102, 103, 104, 105])
def test_kill9_streaming_exactly_once_trials(broker, tmp_path, seed):
    _kill_trial(broker.bootstrap, tmp_path, seed=seed)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                 st.dictionaries(st.sampled_from(["id", "modality", "source", "license", "text", "uri", "data_b64", "meta", "x"]),
                                 st.one_of(st.none(), st.integers(), st.text(max_size=20), st.booleans(),
                                           st.sampled_from(["text", "audio", "smell"])), max_size=8)
                 .map(lambda d: json.dumps(d).encode())))
def test_fuzz_decode_never_crashes(raw):
    try:
        record = decode_record(raw, ValidateConfig())
    except Invalid as e:
        assert e.reason
    else:
        assert record.id and record.modality


_VALID = st.builds(lambda i, t: raw_record(f"v{i}", t), st.integers(0, 10**6), st.text(min_size=1, max_size=80))


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=60).filter(lambda b: b"\n" not in b and b.strip()), _VALID),
                min_size=5, max_size=25))
def test_fuzz_pipeline_settles_every_record(tmp_path_factory, records):
    """Fuzzed lines never crash the job; every line is settled; every bad one is dead-lettered."""
    from streams.mds import settled_ranges

    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "in.jsonl"
    src.write_bytes(b"".join(r + b"\n" for r in records))
    summary = run(["--input", str(src), "--stream-root", str(tmp / "s"), "--min-doc-words", "1"])
    lines = [ln for ln in src.read_bytes().split(b"\n")[:-1]]
    settled = sum(r.end - r.start for r in settled_ranges(str(tmp / "s")))
    assert settled == sum(1 for ln in lines if ln.strip())
    bad = 0
    for ln in lines:
        try:
            from beam_jobs.validate import text_of

            text_of(decode_record(ln, ValidateConfig()), ValidateConfig())
        except Invalid:
            bad += 1
    assert summary["dead_letters"] == bad
