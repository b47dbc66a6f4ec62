"""Fault injection (issue 14): disk full on the stream root, a paused broker, a corrupt checkpoint.

Each fault must end with a clear alert, no record lost or written twice, and recovery. The
scenarios live in :mod:`fault_scenarios` (tests/helpers) so that bench/bench_reliability.py
runs the same code and reports its figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import stock_ids

from beam_jobs.disk_full import is_disk_full
from streams.events import OffsetRange
from streams.mds import LiveStreamWriter, settled_ranges

HELPERS = Path(__file__).resolve().parent / "helpers"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HELPERS / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tmpfs = _load("tmpfs")
workload = _load("mds_workload")
scenarios = _load("fault_scenarios")


def _leftovers(root: str) -> list[str]:
    """Temp files, unpublished shard files and staging dirs left in the root."""
    from streams.manifest import read_index, shard_name_of

    published = {shard_name_of(i) for i in read_index(root)["shards"]}
    out = [n for n in os.listdir(root) if n.endswith(".tmp") or ".tmp-" in n]
    out += [n for n in os.listdir(root) if ".mds" in n and n.split(".mds")[0] not in published]
    out += os.listdir(os.path.join(root, ".staging"))
    return out


def test_disk_full_writer_publishes_nothing_partial_and_recovers(tmp_path):
    """At every point a shard publish can run out of space, the root stays consistent: the
    settled ranges are exactly the published shards, index.json parses, no temp file or orphan
    shard is left; once space is freed the same write succeeds, each sample exactly once."""
    with tmpfs.small_tmpfs(tmp_path / "mnt", "256k") as mnt:
        root = os.path.join(mnt, "s")
        w = LiveStreamWriter(root, writer_id="w0", manifest={"vocab_version": "v-test"})
        w.write_shard(workload.make_samples("w0", 0, 20), domain="web",
                      settled=[OffsetRange(topic="t", partition=0, start=0, end=20)])
        before = stock_ids(root)
        second = workload.make_samples("w0", 1, 60)
        failures = 0
        for pages in range(12):  # leave 0, 1, 2... pages free: fail at each step of a publish
            ballast = tmpfs.fill(mnt, leave=pages * tmpfs.PAGE)
            try:
                w.write_shard(second, domain="web", settled=[OffsetRange(topic="t", partition=0, start=20, end=80)])
            except OSError as e:
                assert is_disk_full(e), e
                failures += 1
                assert settled_ranges(root) == [OffsetRange(topic="t", partition=0, start=0, end=20)]
                with open(os.path.join(root, "index.json")) as f:
                    assert json.load(f)["version"] == 2
                assert _leftovers(root) == []
                assert stock_ids(root) == before
                os.unlink(ballast)
                continue
            os.unlink(ballast)
            break
        else:
            pytest.fail("the write never succeeded with 11 pages free")
        assert failures >= 2, "the disk never ran full: the test does not test anything"
        ids = stock_ids(root)
        assert sorted(ids) == sorted(before + [s["id"] for s in second]) and len(ids) == len(set(ids))
        assert settled_ranges(root) == [OffsetRange(topic="t", partition=0, start=0, end=80)]


def test_disk_full_streaming_ingest_alerts_waits_and_resumes(broker, tmp_path):
    """Streaming ingest onto a tiny tmpfs that fills up: Alert ``ingest.disk_full``, nothing
    settled without its data, and after space is freed it resumes on its own: every valid
    record exactly once in the stock StreamingDataset."""
    r = scenarios.disk_full_ingest(broker.bootstrap, tmp_path)
    assert r.alerts and r.alerts[0]["rule"] == "ingest.disk_full" and r.alerts[0]["severity"] == "critical"
    assert r.resolved, "no ingest.disk_full_resolved alert after space was freed"
    assert "disk full on stream root" in r.log
    assert r.lost == [] and r.duplicates == 0 and r.notes == []
    assert r.settled_while_full_ok and r.leftovers == []
    assert r.recovery_s < 30


@pytest.mark.slow
def test_corrupt_latest_checkpoints_fall_back_to_the_newest_intact_one(tmp_path):
    """A truncated latest checkpoint without its manifest (caught by the failed load) and a
    silently garbled one before it (same size: only the signed manifest's hash shows it) are
    detected, alerted and moved aside; the trainer resumes from the checkpoint before them (not
    from scratch) and re-trains the same losses."""
    r = scenarios.corrupt_checkpoint(tmp_path, steps=12, every=4)
    assert r.exit_code == 0, r.log[-3000:]
    assert r.moved_aside and {n.split(".")[0] for n in r.moved_aside} == {"step-12", "step-8"}
    assert len(r.alerts) == 1 and r.alerts[0]["severity"] == "critical"
    assert "step-12" in r.alerts[0]["message"] and "step-8" in r.alerts[0]["message"]
    assert r.resumed_step == 4
    assert r.retrained == list(range(5, 13)), r.retrained  # steps 1-4 not trained again: no fresh start
    assert r.losses_match
    assert "checkpoint step-12" in r.log and "load failed" in r.log and "hash_mismatch" in r.log


@pytest.mark.slow
def test_broker_paused_30s_nothing_lost_or_duplicated(fresh_broker, tmp_path):
    """SIGSTOP the broker 30 s while streaming ingest runs and a trainer uses Kafka (control,
    metrics, checkpoint events): both warn while it is unreachable, alert once it is back,
    finish, and lose or duplicate nothing (records, checkpoint events)."""
    r = scenarios.broker_pause(fresh_broker, tmp_path, pause_s=30)
    assert r.exit_code == 0, r.log[-3000:]
    assert r.trainer_exit == 0, r.trainer_log[-3000:]
    assert r.lost == [] and r.duplicates == 0 and r.notes == []
    assert r.trainer_steps == list(range(1, 41))
    assert sorted(r.checkpoint_events) == [10, 20, 30, 40]  # each announced exactly once
    assert any("streaming ingest" in w for w in r.warnings) and any("trainer" in w for w in r.warnings)
    assert {a["source"] for a in r.alerts} >= {"ingest", "trainer"}
    assert all(a["evidence"]["duration_s"] >= 25 for a in r.alerts)
    assert r.recovery_s < 30


def test_broker_watch_warns_while_paused_and_reports_the_outage(fresh_broker, caplog):
    """The liveness probe behind ``kafka.broker_unreachable``: a stopped broker accepts TCP
    connections but never answers; the watch warns while it lasts and reports its length."""
    import signal
    import time

    from streams.broker_watch import BrokerWatch, probe

    assert probe(fresh_broker.bootstrap)
    restored: list[float] = []
    watch = BrokerWatch(fresh_broker.bootstrap, who="test", on_restored=restored.append, interval_s=0.3,
                        timeout_s=0.5, warn_after_s=1.0, repeat_s=60)
    try:
        with caplog.at_level("WARNING", logger="headwater.kafka.watch"):
            os.kill(fresh_broker.pid, signal.SIGSTOP)
            try:
                time.sleep(3)
                assert not probe(fresh_broker.bootstrap, timeout_s=0.5)
            finally:
                os.kill(fresh_broker.pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while not restored and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        watch.close()
    assert any("unreachable for" in r.getMessage() for r in caplog.records)
    assert len(restored) == 1 and 2.5 <= restored[0] < 10
    assert probe(fresh_broker.bootstrap)


class _StallableBroker:
    """A TCP peer answering ApiVersions like a broker (size + correlation id), silent while
    ``stalled`` is set: a real socket, so the watch's probe runs unchanged."""

    def __init__(self):
        import socket
        import threading

        self.stalled = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.bootstrap = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import struct
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn, struct), daemon=True).start()

    def _answer(self, conn, struct) -> None:
        with conn:
            try:
                size = struct.unpack(">i", conn.recv(4))[0]
                body = conn.recv(size)
                if self.stalled.is_set():
                    conn.recv(1)  # hold the connection, never answer (until the prober hangs up)
                    return
                conn.sendall(struct.pack(">ii", 4, struct.unpack(">i", body[4:8])[0]))
            except OSError:
                return

    def close(self) -> None:
        self.server.close()


def test_broker_watch_one_slow_probe_is_not_an_outage():
    """False alarms: a probe left unanswered once (a broker busy for less than ``warn_after_s``)
    must neither warn nor report a restored outage; a stall longer than that does both, once."""
    import time

    from streams.broker_watch import BrokerWatch, probe

    peer = _StallableBroker()
    restored: list[float] = []
    try:
        assert probe(peer.bootstrap, timeout_s=0.5)
        # the defaults' proportions (timeout 3 s + interval 2 s = warn_after 5 s), scaled down
        watch = BrokerWatch(peer.bootstrap, who="test", on_restored=restored.append, interval_s=0.5,
                            timeout_s=0.5, warn_after_s=1.0, repeat_s=60)
        try:
            for _ in range(5):  # five short blips (0.2 s): each leaves at most one probe unanswered
                time.sleep(1.2)
                peer.stalled.set()
                time.sleep(0.2)
                peer.stalled.clear()
            time.sleep(1.5)
            assert restored == [] and watch.outages == [], "a single slow probe was reported as an outage"
            peer.stalled.set()  # a real outage: 2.5 s
            time.sleep(2.5)
            peer.stalled.clear()
            deadline = time.monotonic() + 5
            while not restored and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            watch.close()
    finally:
        peer.close()
    assert len(restored) == 1 and 1.5 <= restored[0] < 4.5, restored


def test_disk_full_is_recognised_from_every_direct_runner_mode(tmp_path):
    """The multi-threading (and multi-processing/portable) runners re-raise a DoFn's ENOSPC only as
    text inside a RuntimeError, no ``__cause__``: it must still read as disk full (else streaming
    ingest crash-loops instead of alerting and waiting), with a one-line error for the alert."""
    import errno

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.disk_full import disk_full_error

    def write(x, path=str(tmp_path / "x")):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def fail(x):
        raise ValueError(f"not a disk problem: {x}")

    for mode in ("in_memory", "multi_threading"):
        for fn, full in ((write, True), (fail, False)):
            options = PipelineOptions([f"--direct_running_mode={mode}", "--direct_num_workers=1"])
            with pytest.raises(Exception) as e, beam.Pipeline(options=options) as p:
                _ = p | beam.Create([1]) | beam.Map(fn)
            assert is_disk_full(e.value) is full, (mode, e.value)
            if full:
                line = disk_full_error(e.value)
                assert "[Errno 28]" in line and "\n" not in line and len(line) <= 500
