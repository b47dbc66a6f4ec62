"""`headwater takedown`: remove every trace of one source from a stream root; say which checkpoints saw it.

    headwater takedown --source NAME --stream-root DIR|s3://BUCKET/PREFIX [--run-dir RUN ...]
                       [--reason TEXT] [--by WHO] [--bootstrap HOST:PORT] [--dlq DIR] [--drops DIR]
                       [--delete-grace-s S]

In this order:

1. The source goes on the stream root's denylist (``_governance/denylist.json``): from the next
   micro-batch on, ingest drops its records (reason ``source_taken_down``) before anything is
   written, dead letters included; re-ingesting it adds nothing.
2. The lineage report is computed for each ``--run-dir``: every checkpoint's ``headwater.json``
   names the tokens it trained per source (trainer/lineage.py).
3. Every shard holding a sample of the source is rewritten without it and published with one
   index.json rewrite (streams/mds_rewrite.py); the old shard files are deleted. Repeated until a
   pass finds nothing (an ingest batch that passed the gate before step 1 may publish late).
4. The removed samples' ids go on the dedup purge lists (``_dedup/purged.npy`` for the text
   near-dup index, ``_semantic_dedup/purged.npy`` for embeddings): the next settlement point
   rewrites each snapshot without their sketches and embeddings (and drops the persisted ANN
   indexes holding them) and never folds them again, so a later near-duplicate of a removed
   document is no longer dropped as its duplicate. Its dead letters (DLQ folder) and drop-log
   lines are removed (files rewritten atomically).
5. With ``--bootstrap``: a signed ``quarantine_source`` Control (operator key) makes live trainers
   drop buffered samples of the source and never read it again; the Kafka ``dlq`` topic is
   scanned and the offsets of the source's dead letters are recorded (Kafka cannot delete single
   records: they leave with the topic's retention, or by an operator's delete-records up to an
   offset, which also drops every older record of every source).
6. An audit record (sha256 of each removed sample/line, counts, who/when/why; never the content)
   is appended to ``_governance/takedowns.jsonl`` (a ``started`` record precedes step 1, so a
   killed takedown leaves one); the report goes to ``_governance/takedown-<id>.json`` and ``.txt``.

Exit codes: 0 done; 1 a step failed (the audit says how far it got), a writer prefix of an
object-store root could not be rewritten (``writers_failed``), or the root lists shards outside
``writers/``; 2 bad usage.
Source names match in their canonical form (streams/source_names.py), so look-alike and
zero-width variants are taken down too.

An object-store root (``s3://…``) is rewritten per writer prefix without a lock (the protocol is
in streams/mds_rewrite.py and docs/ARCHITECTURE.md); live writers keep publishing. The denylist,
audit records and report are objects under ``<root>/_governance/``; the replaced shard objects are
deleted ``--delete-grace-s`` after the indexes stopped listing them. The dedup purge lists of
such a root are the objects ``<root>/_dedup/purged.npy``, ``_semantic_dedup/purged.npy`` and
``_media_dedup/purged.npy`` (conditional puts): every machine's settled-index cache reads them
at its next settlement point (beam_jobs/dedup/snapshot.py). It has no ``_ingest`` folder: DLQ
and drop logs are scrubbed only where ``--dlq``/``--drops`` name the ingest host's local folders.
"""

from __future__ import annotations

import argparse
import getpass
import glob
import hashlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict
from typing import Any

from infra.dedup_purge import PurgeIntent, purge_dedup
from streams import governance as gov
from streams import manifest as mf
from streams import storage, writer_log
from streams.events import DeadLetter, EventError
from streams.mds_rewrite import ForeignEntries, Removed, remove_samples
from streams.source_names import canonical_source

__all__ = ["build_parser", "checkpoint_lineage", "main", "scrub_jsonl", "takedown"]

MAX_PASSES = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwater takedown", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the source name, exactly as in RawRecord.source")
    p.add_argument("--stream-root", required=True, help="live MDS stream root (directory or s3://bucket/prefix)")
    p.add_argument("--run-dir", action="append", default=[], help="trainer run directory to report on (repeatable)")
    p.add_argument("--reason", default="", help="why (kept in the audit record and the denylist)")
    p.add_argument("--by", default="", help="who asked (default: the OS user)")
    p.add_argument("--bootstrap", help="Kafka HOST:PORT: send a signed quarantine_source, scan the dlq topic")
    p.add_argument("--dlq", help="dead-letter folder (default: <stream-root>/_ingest/dlq)")
    p.add_argument("--drops", help="drop-log folder (default: <stream-root>/_ingest/drops)")
    p.add_argument("--delete-grace-s", type=float, default=30.0,
                   help="object-store roots: seconds between the index commits and deleting the replaced "
                        "shard objects, so readers of the previous index can still fetch them (default 30)")
    return p


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_lineage(run_dir: str, source: str) -> dict[str, Any]:
    """For one run: every checkpoint with the tokens it trained from ``source`` (None: no lineage)."""
    name, ckpts = canonical_source(source), []
    for meta in sorted(glob.glob(os.path.join(run_dir, "**", "step-*", "headwater.json"), recursive=True)):
        with open(meta) as f:
            info = json.load(f)
        by_source = (info.get("lineage") or {}).get("tokens_by_source")
        ckpts.append({"path": os.path.dirname(meta), "step": info.get("step"), "run_id": info.get("run_id"),
                      "tokens": info.get("tokens"),
                      "source_tokens": None if by_source is None else sum(
                          int(n) for s, n in by_source.items() if canonical_source(s) == name)})
    ckpts.sort(key=lambda c: (c["step"] is None, c["step"], c["path"]))
    return {"run_dir": os.path.abspath(run_dir), "checkpoints": ckpts,
            "saw_source": [c["path"] for c in ckpts if c["source_tokens"]],
            "unknown": [c["path"] for c in ckpts if c["source_tokens"] is None]}


def scrub_jsonl(folder: str, matches) -> list[dict[str, Any]]:
    """Rewrite every ``*.jsonl`` under ``folder`` without the lines ``matches(obj)`` selects
    (atomic per file); the audit entries (file, line sha256) of the removed lines."""
    removed = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.jsonl"), recursive=True)):
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                hit = bool(line.strip()) and matches(json.loads(line))
            except (ValueError, EventError):
                hit = False
            if hit:
                removed.append({"file": os.path.relpath(path, folder), "sha256": _sha(line.rstrip(b"\n"))})
            else:
                keep.append(line)
        if len(keep) == len(lines):
            continue
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return removed


def _is(source: str, value: Any) -> bool:
    return isinstance(value, str) and canonical_source(value) == canonical_source(source)


def _dead_letter_of(source: str):
    def matches(obj: Any) -> bool:
        return _is(source, gov.dead_letter_source(DeadLetter.from_dict(obj)))
    return matches


def _drop_of(source: str):
    def matches(obj: Any) -> bool:
        return isinstance(obj, dict) and _is(source, obj.get("source"))
    return matches


def _kafka_dlq_offsets(bootstrap: str, source: str, timeout_s: float = 10.0) -> list[list[int]]:
    """``[partition, offset]`` of every dead letter of ``source`` now in the ``dlq`` topic."""
    from kafka import TopicPartition

    from streams.events import decode_event
    from streams.kafka import KafkaSettings, make_consumer

    consumer = make_consumer(KafkaSettings.load(bootstrap=bootstrap), assign=[], group_id=None)
    try:
        tps = [TopicPartition("dlq", p) for p in sorted(consumer.partitions_for_topic("dlq") or ())]
        if not tps:
            return []
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        found, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in tps):
            for tp, records in consumer.poll(timeout_ms=200).items():
                for r in records:
                    try:
                        ev = decode_event(r.value)
                    except EventError:
                        continue
                    if isinstance(ev, DeadLetter) and _is(source, gov.dead_letter_source(ev)):
                        found.append([tp.partition, r.offset])
        return found
    finally:
        consumer.close()


def _quarantine(bootstrap: str, source: str, reason: str) -> int:
    from infra import control_cli

    return control_cli.main(["quarantine-source", "--bootstrap", bootstrap, "--source", source,
                             "--reason", f"takedown: {reason or 'no reason given'}"])


def _purge_dedup(intent: PurgeIntent, ids: list[str], *, remote: bool) -> tuple[int, int, int]:
    """Put the removed samples' ids, and (local root) those a failed earlier takedown recorded,
    on the purge lists of the root's text, semantic and media dedup indexes (a local root: those
    it has; an object-store root: its purge-list objects, read by every machine's index cache):
    they leave the snapshots at the next settlement point. The ids newly purged from each."""
    counts = purge_dedup(intent.root, ids) if remote else intent.purge(ids)
    return counts["text"], counts["semantic"], counts["media"]


def takedown(source: str, stream_root: str, *, run_dirs: list[str] = (), reason: str = "", by: str = "",
             bootstrap: str | None = None, dlq_dir: str | None = None, drops_dir: str | None = None,
             delete_grace_s: float = 30.0) -> dict[str, Any]:
    """Take ``source`` down from ``stream_root``, a directory or an object-store URL (see the
    module docstring); the report."""
    remote = storage.is_remote(stream_root)
    root = storage.normalize_root(stream_root)
    if remote:
        writer_log.merge_index(storage.object_root(root))  # a merge a crashed writer or takedown left pending
    if not mf.read_index(root)["shards"]:
        raise ValueError(f"{root} is not a stream root (no published shard)")
    tid, started = uuid.uuid4().hex, time.time()
    by = by or getpass.getuser()
    audit: dict[str, Any] = {"takedown_id": tid, "source": source, "source_sha256": _sha(source.encode()),
                             "by": by, "reason": reason, "started_at": started, "stream_root": root}
    gov.append_audit(root, {**audit, "phase": "started"})  # a killed takedown still leaves a record
    audit["phase"] = "finished"
    gov.deny(root, source, by=by, reason=reason, takedown_id=tid)
    report: dict[str, Any] = {"takedown_id": tid, "source": source, "stream_root": root,
                              "runs": [checkpoint_lineage(r, source) for r in run_dirs]}
    removed: list[Removed] = []
    intent = PurgeIntent(root)  # local roots: matching ids are recorded before removal (re-run safe)
    match = (lambda s: _is(source, s["source"])) if remote else intent.recording(lambda s: _is(source, s["source"]))
    replaced: dict[str, str | None] = {}
    deleted: list[str] = []
    failed: dict[str, str] = {}  # object store: writer prefixes the last pass could not rewrite
    try:
        for _ in range(MAX_PASSES):
            result = remove_samples(root, match, delete_grace_s=delete_grace_s)
            removed += result.removed
            replaced.update(result.replaced)
            deleted += result.deleted
            failed = result.failed
            if not result.removed:
                break
        text, semantic, media = _purge_dedup(intent, [r.id for r in removed], remote=remote)
        ingest = None if remote else os.path.join(root, "_ingest")
        dlq_dir = dlq_dir or (ingest and os.path.join(ingest, "dlq"))
        drops_dir = drops_dir or (ingest and os.path.join(ingest, "drops"))
        dlq = scrub_jsonl(dlq_dir, _dead_letter_of(source)) if dlq_dir else None
        drops = scrub_jsonl(drops_dir, _drop_of(source)) if drops_dir else None
        kafka: dict[str, Any] = {"quarantine_control": None, "dlq_topic_offsets": None}
        if bootstrap:
            kafka["quarantine_control"] = "sent" if _quarantine(bootstrap, source, reason) == 0 else "FAILED"
            kafka["dlq_topic_offsets"] = _kafka_dlq_offsets(bootstrap, source)
    except BaseException as e:
        audit.update(finished_at=time.time(), error=f"{type(e).__name__}: {e}", shards_replaced=replaced,
                     samples_removed=len(removed), files_deleted=deleted, writers_failed=failed)
        gov.append_audit(root, audit)
        raise
    licenses = Counter()
    for r in removed:
        licenses[r.license] += r.tokens
    audit.update(
        finished_at=time.time(), shards_replaced=replaced, samples_removed=len(removed),
        tokens_removed=sum(r.tokens for r in removed), tokens_by_license=dict(licenses),
        sample_sha256=sorted(_sha(f"{r.id}\0{r.sha256}".encode()) for r in removed),
        dlq_removed=dlq, drops_removed=drops, kafka=kafka, text_ids_purged=text, semantic_ids_purged=semantic,
        media_ids_purged=media, files_deleted=deleted, writers_failed=failed,
    )
    gov.append_audit(root, audit)
    report.update(
        samples_removed=len(removed), tokens_removed=audit["tokens_removed"], tokens_by_license=dict(licenses),
        shards_replaced=replaced, dlq_lines_removed=None if dlq is None else len(dlq),
        drop_lines_removed=None if drops is None else len(drops), kafka=kafka,
        text_ids_purged=text, semantic_ids_purged=semantic, media_ids_purged=media, files_deleted=len(deleted), writers_failed=failed,
        removed=[asdict(r) | {"id": _sha(r.id.encode())} for r in removed],
    )
    return report


def _count(n: int | None) -> str:
    return "(not scrubbed: no folder given)" if n is None else str(n)


def _text(report: dict[str, Any]) -> str:
    lines = [f"takedown {report['takedown_id']} of source {report['source']!r} in {report['stream_root']}",
             (f"  removed {report['samples_removed']} samples ({report['tokens_removed']} tokens) from "
              f"{len(report['shards_replaced'])} shards; {_count(report['dlq_lines_removed'])} dead letters "
              f"and {_count(report['drop_lines_removed'])} drop-log lines"),
             f"  tokens by license: {report['tokens_by_license'] or '-'}"]
    for writer_id, why in sorted(report["writers_failed"].items()):
        lines.append(f"  FAILED: writer prefix {writer_id} not rewritten (may still hold the source): {why}")
    k = report["kafka"]
    if k["quarantine_control"] is not None:
        lines.append(f"  quarantine_source control: {k['quarantine_control']}; dlq topic records of the source "
                     f"(left to retention): {len(k['dlq_topic_offsets'] or [])}")
    for run in report["runs"]:
        lines.append(f"  run {run['run_dir']}: {len(run['saw_source'])} of {len(run['checkpoints'])} checkpoints "
                     "trained on it")
        for c in run["checkpoints"]:
            if c["source_tokens"]:
                lines.append(f"    step {c['step']}: {c['source_tokens']} tokens  {c['path']}")
        if run["unknown"]:
            lines.append(f"    {len(run['unknown'])} checkpoints record no lineage (older trainer): unknown")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``headwater takedown``."""
    a = build_parser().parse_args(argv)
    try:
        report = takedown(a.source, a.stream_root, run_dirs=a.run_dir, reason=a.reason, by=a.by,
                          bootstrap=a.bootstrap, dlq_dir=a.dlq, drops_dir=a.drops,
                          delete_grace_s=a.delete_grace_s)
    except ValueError as e:
        print(f"headwater takedown: {e}", file=sys.stderr)
        return 2
    except ForeignEntries as e:
        print(f"headwater takedown: {e}", file=sys.stderr)
        return 1
    text = _text(report)
    where = gov.save_report(report["stream_root"], report["takedown_id"], report, text)
    sys.stdout.write(text + f"  report: {where}\n")
    return 1 if report["kafka"]["quarantine_control"] == "FAILED" or report["writers_failed"] else 0
