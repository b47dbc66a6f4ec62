"""Takedown by source: real bounded ingest of two sources into a live MDS stream, `headwater
takedown` of one, then a stock StreamingDataset, a TailReader mid-stream, the DLQ and drop logs,
the denylist on re-ingest, the audit record and the per-checkpoint lineage report."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from beam_jobs.ingest import run
from beam_jobs.synthetic import english_doc, raw_record
from infra.cli import main as cli
from infra.takedown import takedown
from streams.governance import denylist
from streams.mds import TailReader, read_index, read_sidecar
from trainer.data.loader import batch_tokens_by
from trainer.data.packer import Doc
from trainer.lineage import SourceLineage
from trainer.runs import train_argv
from trainer.synthetic import write_stream

ROOT = str(Path(__file__).resolve().parent.parent)
GONE, KEPT = "web_news", "web"  # "web" is a prefix of "web_news": names must match exactly


def records(prefix: str, n: int, seed: int) -> tuple[list[bytes], dict[str, str]]:
    """Alternating GONE/KEPT docs (one domain, so shards mix both), a dead letter and a filtered
    record of each source; the id -> source of the docs that pass."""
    rng = random.Random(seed)
    out, sources = [], {}
    for i in range(n):
        source = GONE if i % 2 else KEPT
        out.append(raw_record(f"{prefix}{i}", english_doc(rng), source=source,
                              license="cc-by-sa" if source == GONE else "cc-by"))
        sources[f"{prefix}{i}"] = source
    for source in (GONE, KEPT):
        out.append(json.dumps({"id": f"{prefix}bad-{source}", "modality": "smell", "source": source,
                               "license": "x", "text": "t"}).encode())
        out.append(raw_record(f"{prefix}short-{source}", "Too short.", source=source))
    return out, sources


def ingest(tmp_path: Path, lines: list[bytes]) -> dict:
    src = tmp_path / f"in-{uuid.uuid4().hex[:6]}.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    return run(["--min-doc-words", "50", "--domain-template", "{language}", "--input", str(src),
                "--stream-root", str(tmp_path / "s")])


def stock_samples(tmp_path: Path) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=str(tmp_path / "s"), local=str(tmp_path / f"cache-{uuid.uuid4().hex[:6]}"),
                          shuffle=False, batch_size=1)
    return [ds[i] for i in range(len(ds))]


def fake_free_checkpoint(run_dir: Path, step: int, tokens_by_source: dict[str, int]) -> Path:
    """A checkpoint's headwater.json as trainer/train.py writes it (lineage from SourceLineage)."""
    lineage = SourceLineage()
    lineage.add(tokens_by_source)
    path = run_dir / "checkpoint" / f"step-{step}"
    path.mkdir(parents=True)
    (path / "headwater.json").write_text(json.dumps({"step": step, "run_id": run_dir.name, "tokens": step * 64,
                                                     "lineage": {"tokens_by_source": lineage.total()}}))
    return path


def test_batch_source_tokens_count_every_input_position_by_source():
    docs = [Doc(id="a", domain="d", tokens=np.arange(5), source="web"),
            Doc(id="b", domain="d", tokens=np.arange(3), source="web_news"),
            Doc(id="c", domain="d", tokens=np.arange(4), source="web")]
    doc_index = np.array([[0, 0, 0, 0, 0, 1], [1, 1, 2, 2, 2, 2]])
    assert batch_tokens_by(docs, doc_index, lambda d: d.source) == {"web": 9, "web_news": 3}
    lineage = SourceLineage()
    lineage.add({"web": 9, "web_news": 3})
    lineage.add({"web": 1})
    restored = SourceLineage()
    restored.load_state_dict(lineage.state_dict())
    assert restored.total() == {"web": 10, "web_news": 3}


def test_takedown_removes_a_source_everywhere_and_reports_its_checkpoints(tmp_path, capsys):
    lines, sources = records("a", 10, seed=1)
    ingest(tmp_path, lines)
    lines_c, sources_c = records("c", 8, seed=3)
    ingest(tmp_path, lines_c)
    sources |= sources_c
    before = stock_samples(tmp_path)
    assert {s["id"]: s["source"] for s in before} == sources
    shards = [n for n, e in read_sidecar(str(tmp_path / "s"))["shards"].items() if e["samples"]]
    assert len(shards) == 2  # one per ingest, each mixing both sources
    dlq = tmp_path / "s" / "_ingest" / "dlq"
    drops = tmp_path / "s" / "_ingest" / "drops"

    def logged(folder: Path) -> list[dict]:
        return [json.loads(x) for f in sorted(folder.glob("*.jsonl")) for x in f.read_text().splitlines()]

    assert {json.loads(base64.b64decode(d["original_b64"]))["source"] for d in logged(dlq)} == {GONE, KEPT}
    assert {d["source"] for d in logged(drops)} >= {GONE, KEPT}

    # a reader that consumed the first shard entirely before the takedown
    reader = TailReader(tmp_path / "s")
    first = read_index(str(tmp_path / "s"))["shards"][0]["samples"]
    seen = [s for _, s in zip(range(first), reader.samples(timeout_s=0), strict=False)]

    run_a, run_b = tmp_path / "run-a", tmp_path / "run-b"
    clean = fake_free_checkpoint(run_a, 10, {KEPT: 640})
    dirty = fake_free_checkpoint(run_a, 20, {KEPT: 900, GONE: 300, "Web_News": 80})  # one source, two spellings
    fake_free_checkpoint(run_b, 5, {KEPT: 320})
    assert cli(["takedown", "--source", GONE, "--stream-root", str(tmp_path / "s"), "--run-dir", str(run_a),
                "--run-dir", str(run_b), "--reason", "license revoked", "--by", "tester"]) == 0
    text = capsys.readouterr().out
    assert "1 of 2 checkpoints trained on it" in text and f"step 20: 380 tokens  {dirty}" in text

    after = stock_samples(tmp_path)
    assert sorted(s["id"] for s in after) == sorted(i for i, s in sources.items() if s == KEPT)
    assert {s["source"] for s in after} == {KEPT}
    # the reader continues without repeating or losing a sample of the kept source
    rest = list(reader.samples(timeout_s=0))
    reader.close()
    kept_ids = [s["id"] for s in seen if s["source"] == KEPT] + [s["id"] for s in rest]
    assert sorted(kept_ids) == sorted(i for i, s in sources.items() if s == KEPT)
    assert all(s["source"] == KEPT for s in rest)
    # dead letters and drop-log lines of the source are gone, the other source's stay
    assert {json.loads(base64.b64decode(d["original_b64"]))["source"] for d in logged(dlq)} == {KEPT}
    assert GONE not in {d.get("source") for d in logged(drops)} and KEPT in {d["source"] for d in logged(drops)}

    gov = tmp_path / "s" / "_governance"
    started, audit = [json.loads(x) for x in (gov / "takedowns.jsonl").read_text().splitlines()]
    assert (started["phase"], audit["phase"]) == ("started", "finished")  # a killed takedown leaves the first
    assert started["takedown_id"] == audit["takedown_id"] and "samples_removed" not in started
    n_gone = sum(1 for s in sources.values() if s == GONE)
    assert audit["samples_removed"] == n_gone and audit["by"] == "tester" and audit["reason"] == "license revoked"
    assert len(audit["sample_sha256"]) == n_gone and len(audit["dlq_removed"]) == 2
    assert set(audit["tokens_by_license"]) == {"cc-by-sa"}
    assert sorted(audit["shards_replaced"]) == sorted(shards) and all(audit["shards_replaced"].values())
    assert "web_news" not in json.dumps(audit["dlq_removed"])
    assert not set(shards) & {p.name.split(".mds")[0] for p in (tmp_path / "s").iterdir()}  # old files deleted
    assert rest  # the second (rewritten) shard was read after the takedown
    (report_file,) = gov.glob("takedown-*.json")
    report = json.loads(report_file.read_text())
    runs = {Path(r["run_dir"]).name: r for r in report["runs"]}
    assert runs["run-a"]["saw_source"] == [str(dirty)] and runs["run-b"]["saw_source"] == []
    assert [c["source_tokens"] for c in runs["run-a"]["checkpoints"]] == [0, 380] and clean.exists()
    assert denylist(str(tmp_path / "s"))[GONE]["reason"] == "license revoked"

    # re-ingesting the source (new records, a bad one too) adds nothing; the other source still flows
    lines2, sources2 = records("b", 6, seed=2)
    lines2.append(raw_record("b-lookalike", english_doc(random.Random(4)), source="web_n\u0435ws\u200b"))
    summary = ingest(tmp_path, lines2)
    final = stock_samples(tmp_path)
    assert {s["source"] for s in final} == {KEPT}
    assert sorted(s["id"] for s in final) == sorted(
        [i for i, s in sources.items() if s == KEPT] + [i for i, s in sources2.items() if s == KEPT])
    assert {json.loads(base64.b64decode(d["original_b64"]))["source"] for d in logged(dlq)} == {KEPT}
    assert summary["stages"]["control"]["drop_source_taken_down"] == sum(1 for s in sources2.values() if s == GONE) + 2


@pytest.mark.slow
def test_a_real_training_run_records_lineage_and_takedown_names_its_checkpoints(tmp_path):
    """Real torchrun (CPU/gloo): checkpoints record tokens per source; the takedown report names them."""
    stream, run_dir = str(tmp_path / "s"), str(tmp_path / "run")
    write_stream(stream, domains={"markov": "markov"}, shards=2, per_shard=40, vocab=512, seed=1, source=KEPT)
    write_stream(stream, domains={"noise": "noise"}, shards=2, per_shard=40, vocab=512, seed=2, source=GONE,
                 writer_id="other")
    cmd = train_argv([stream], run_dir, "--nproc", "1", "--vocab-size", "512", "--no-wandb", "--mixing", "static",
                     "--steps", "4", "--checkpoint-every", "2")
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    infos = {int(p.parent.name.split("-")[1]): json.loads(p.read_text())
             for p in Path(run_dir).glob("**/step-*/headwater.json")}
    assert sorted(infos) == [2, 4]
    for info in infos.values():
        by_source = info["lineage"]["tokens_by_source"]
        assert set(by_source) <= {KEPT, GONE} and by_source.get(GONE, 0) > 0
        # per license too (the synthetic stream is all cc0): the same tokens, counted by license
        assert info["lineage"]["tokens_by_license"] == {"cc0": sum(by_source.values())}
    assert sum(infos[4]["lineage"]["tokens_by_source"].values()) == 2 * sum(
        infos[2]["lineage"]["tokens_by_source"].values())  # same tokens per step
    with open(os.path.join(run_dir, "checkpoints.jsonl")) as f:
        events = [json.loads(line) for line in f]
    assert [e["lineage"] for e in events] == [infos[2]["lineage"], infos[4]["lineage"]]

    report = takedown(GONE, stream, run_dirs=[run_dir], reason="test", by="tester")
    (run,) = report["runs"]
    assert [c["step"] for c in run["checkpoints"] if c["source_tokens"]] == [2, 4]
    assert [c["source_tokens"] for c in run["checkpoints"]] == [
        infos[s]["lineage"]["tokens_by_source"][GONE] for s in (2, 4)]
    assert report["samples_removed"] == 80 and {s["source"] for s in stock_samples(tmp_path)} == {KEPT}


def test_takedown_with_a_broker_quarantines_live_consumers_and_finds_dlq_topic_records(broker, tmp_path):
    """With --bootstrap: a signed quarantine_source reaches the control topic (what live trainers and
    ingest follow); the source's dead letters still in the Kafka ``dlq`` topic are located."""
    from streams.events import Control, DeadLetter, decode_event
    from streams.kafka import KafkaSettings, make_consumer, make_producer, poll_records, publish
    from streams.signing import ControlVerifier

    gone = f"src-{uuid.uuid4().hex[:8]}"
    stream = str(tmp_path / "s")
    write_stream(stream, domains={"noise": "noise"}, shards=1, per_shard=5, vocab=512, source=gone)
    write_stream(stream, domains={"markov": "markov"}, shards=1, per_shard=5, vocab=512, source=KEPT,
                 writer_id="other")
    settings = KafkaSettings(bootstrap=broker.bootstrap)
    producer = make_producer(settings)
    sent = {}
    for source in (gone, KEPT, gone):
        dead = DeadLetter.of(raw_record(f"{source}-{uuid.uuid4().hex[:4]}", "x", source=source),
                             reason="test", stage="test")
        meta = publish(producer, "dlq", dead)
        sent.setdefault(source, []).append([meta.partition, meta.offset])
    producer.close()
    control_consumer = make_consumer(settings, topics=["control"], group_id=f"t-{uuid.uuid4().hex}")
    poll_records(control_consumer, timeout_s=2)  # joined, at the end

    report = takedown(gone, stream, reason="court order", by="tester", bootstrap=broker.bootstrap)
    assert report["kafka"]["quarantine_control"] == "sent"
    assert report["kafka"]["dlq_topic_offsets"] == sent[gone]
    assert report["samples_removed"] == 5 and {s["source"] for s in stock_samples(tmp_path)} == {KEPT}
    got = []
    for rec in poll_records(control_consumer, timeout_s=30, until=lambda seen: bool(got)):
        ev = decode_event(rec.value)
        if isinstance(ev, Control) and ev.args.get("source") == gone:
            got.append(ev)
    control_consumer.close()
    (control,) = got
    assert control.command == "quarantine_source" and "court order" in control.reason
    assert ControlVerifier.from_env().verify(control).role == "operator"


def test_a_restored_cursor_inside_a_rewritten_shard_continues_at_the_same_sample(tmp_path):
    from streams.mds_rewrite import remove_samples

    stream = str(tmp_path / "s")
    write_stream(stream, domains={"noise": "noise"}, shards=2, per_shard=5, vocab=512, source=KEPT)
    reader = TailReader(stream)
    first = [s["id"] for _, s in zip(range(2), reader.samples(timeout_s=0), strict=False)]
    cursor = reader.state_dict()
    reader.close()
    assert first == ["noise-0-0", "noise-0-1"] and cursor["position"] == 2
    gone = {"noise-0-0", "noise-0-3", "noise-1-1"}
    result = remove_samples(stream, lambda s: s["id"] in gone)
    assert len(result.replaced) == 2 and result.kept == 7
    resumed = TailReader(stream)
    resumed.load_state_dict(cursor)
    rest = [s["id"] for s in resumed.samples(timeout_s=0)]
    resumed.close()
    assert rest == ["noise-0-2", "noise-0-4", "noise-1-0", "noise-1-2", "noise-1-3", "noise-1-4"]


def test_a_dead_letter_of_hostile_bytes_has_no_source_and_does_not_crash():
    from streams.events import DeadLetter
    from streams.governance import dead_letter_source

    for original in (b"[" * 100_000, b'{"source": ' + b"[" * 50_000, b"\xff\xfe", b'{"source": "web"}'):
        dead = DeadLetter.of(original, reason="malformed_json", stage="validate")
        assert dead_letter_source(dead) in (None, "web")
