"""Object-store stream roots against a real S3-compatible server (moto's server mode on 127.0.0.1),
configured through environment variables (the standard ``AWS_*`` ones plus ``S3_ENDPOINT_URL``,
which mosaicml-streaming also reads): two writers publish to s3://…, TailReader tails them, a
stock StreamingDataset reads the merged index with ``remote=`` and from a local copy, a crash
between the shard upload and the metadata puts leaves nothing visible, settlement reads back
from the s3 root, and a second process with the same writer id, unknown put outcomes, threads,
large conditional bodies, 409 conflicts and a missing bucket are handled (faults that moto cannot
produce, a 409 or a dropped connection, are injected at the botocore client)."""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from streams import storage
from streams import writer_log as wl
from streams.events import OffsetRange
from streams.mds import LiveStreamWriter, TailReader, read_index, read_sidecar, settled_ranges
from streams.vocab import Vocab

HELPER = pathlib.Path(__file__).parent / "helpers" / "mds_workload.py"
_spec = importlib.util.spec_from_file_location("mds_workload", HELPER)
workload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(workload)

MANIFEST = {"vocab_version": Vocab.default().version, "pipeline_version": "test@1"}


def rng(start: int, end: int, topic: str = "raw.text", partition: int = 0) -> OffsetRange:
    return OffsetRange(topic=topic, partition=partition, start=start, end=end)


def writer(root: str, writer_id: str, **kw) -> LiveStreamWriter:
    return LiveStreamWriter(root, writer_id=writer_id, manifest=MANIFEST, vocab_size=Vocab.default().size, **kw)


def publish(root: str, writer_id: str, shards: int, per: int = 4) -> list[str]:
    """``shards`` shards of ``per`` samples, settling raw.<writer_id> offsets [10k, 10k+10)."""
    with writer(root, writer_id) as w:
        for k in range(shards):
            w.write_shard(workload.make_samples(writer_id, k, per), domain="web",
                          settled=[rng(k * 10, k * 10 + 10, topic=f"raw.{writer_id}")])
    return [f"{writer_id}-{k}-{i}" for k in range(shards) for i in range(per)]


def keys(root: str) -> list[str]:
    return sorted(e["name"] for e in storage.object_root(root).fs.find(storage.object_root(root).base,
                                                                        detail=True).values())


def test_two_writers_publish_and_tail_reader_tails_them(s3_root):
    reader = TailReader(s3_root)
    assert reader.poll() == []
    ids = publish(s3_root, "w0", 3)
    got = [s["id"] for s in reader.samples(timeout_s=0)]
    assert got == ids
    ids += publish(s3_root, "w1", 2)
    got += [s["id"] for s in reader.samples(timeout_s=0)]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got)) == 20
    for s in TailReader(s3_root).samples(timeout_s=0):  # a fresh reader, tokens checked
        assert np.array_equal(s["tokens"], workload.expected_tokens(s["id"]))
    base = storage.object_root(s3_root).base
    names = keys(s3_root)
    # every writer owns its own prefix; nothing is staged or locked in the bucket
    assert {n.removeprefix(base + "/").split("/")[0] for n in names} == {"index.json", "writers"}
    assert sum(n.endswith(".mds.zstd") for n in names) == 5
    assert [mf_name.rsplit("/", 2)[-2] for mf_name in names if mf_name.endswith("/headwater.json")] == ["w0", "w1"]
    merged = read_index(s3_root)["shards"]
    assert [i["raw_data"]["basename"].split("/")[1] for i in merged] == ["w0"] * 3 + ["w1"] * 2
    assert len(read_sidecar(s3_root)["shards"]) == 5


def test_stock_streaming_dataset_reads_remote_and_local_copy(s3_root, tmp_path):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    ids = publish(s3_root, "w0", 3) + publish(s3_root, "w1", 2)
    clean_stale_shared_memory()
    ds = StreamingDataset(remote=s3_root, local=str(tmp_path / "cache"), shuffle=False, batch_size=1)
    got = [s["id"] for s in ds]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    del ds
    copy = tmp_path / "copy"
    store = storage.object_root(s3_root)
    store.fs.get(store.base + "/", str(copy), recursive=True)
    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(copy), shuffle=False, batch_size=1)
    got = [s["id"] for s in ds]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    # every writer's sub-root is itself a stock MDS dataset
    clean_stale_shared_memory()
    ds = StreamingDataset(remote=f"{s3_root}/writers/w1", local=str(tmp_path / "w1"), shuffle=False, batch_size=1)
    assert sorted(s["id"] for s in ds) == sorted(i for i in ids if i.startswith("w1-"))


CRASH = textwrap.dedent("""
    import os, sys
    from streams import storage
    from streams.events import OffsetRange
    from streams.mds import LiveStreamWriter
    sys.path.insert(0, os.path.dirname(sys.argv[2]))
    import mds_workload
    put = storage.ObjectRoot.put
    uploaded = []
    def dying_put(self, rel, data, **kw):
        if uploaded and rel.endswith(".json"):  # the shard object is up; die before its log record's put
            os._exit(9)
        uploaded.extend([rel] if ".mds" in rel else [])
        return put(self, rel, data, **kw)
    storage.ObjectRoot.put = dying_put
    w = LiveStreamWriter(sys.argv[1], writer_id="w0", manifest={"vocab_version": sys.argv[3]})
    w.write_shard(mds_workload.make_samples("w0", 1, 4), domain="web",
                  settled=[OffsetRange(topic="raw.w0", partition=0, start=10, end=20)])
""")


def test_crash_between_upload_and_metadata_leaves_nothing_visible(s3_root):
    publish(s3_root, "w0", 1)  # shard 0 settles [0, 10)
    r = subprocess.run([sys.executable, "-c", CRASH, s3_root, str(HELPER), MANIFEST["vocab_version"]],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-2000:]
    assert sum(n.endswith(".mds.zstd") for n in keys(s3_root)) == 2  # the orphan is in the bucket ...
    assert len(read_index(s3_root)["shards"]) == 1  # ... but no index lists it
    assert [s["id"] for s in TailReader(s3_root).samples(timeout_s=0)] == [f"w0-0-{i}" for i in range(4)]
    assert settled_ranges(s3_root) == [rng(0, 10, topic="raw.w0")]
    with writer(s3_root, "w0"):  # restart: the orphan is younger than the grace period, so it stays
        assert sum(n.endswith(".mds.zstd") for n in keys(s3_root)) == 2
    with writer(s3_root, "w0", orphan_grace_s=0) as w:  # restart: the orphan is removed, the batch re-published
        assert sum(n.endswith(".mds.zstd") for n in keys(s3_root)) == 1
        w.write_shard(workload.make_samples("w0", 1, 4), domain="web", settled=[rng(10, 20, topic="raw.w0")])
    assert sorted(s["id"] for s in TailReader(s3_root).samples(timeout_s=0)) == sorted(
        f"w0-{k}-{i}" for k in range(2) for i in range(4))
    assert settled_ranges(s3_root) == [rng(0, 20, topic="raw.w0")]


def test_settled_ranges_replay_and_settle_only_on_s3(s3_root):
    publish(s3_root, "w0", 2)
    publish(s3_root, "w1", 1)
    with writer(s3_root, "w1") as w:
        empty = w.write_shard([], domain="web", settled=[rng(10, 30, topic="raw.w1")])
        assert empty.samples == 0
        again = w.write_shard(workload.make_samples("w1", 0, 4), domain="web", settled=[rng(0, 10, topic="raw.w1")])
        assert again.writer_id == "w1" and again.samples == 4  # an exact replay is a no-op
        assert w.settled() == [rng(0, 20, topic="raw.w0"), rng(0, 30, topic="raw.w1")]
    from beam_jobs.settlement import ResumePlan

    assert ResumePlan.of_stream(s3_root).count() == 50
    assert len(read_index(s3_root)["shards"]) == 3


def test_two_processes_append_concurrently_and_the_merged_index_loses_nothing(s3_root, tmp_path):
    """Two writer processes publish at the same time; the merged root index is a compare-and-swap
    on one object, so both must end up with every shard, in an order every reader shares."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(HELPER), "append", s3_root, f"p{i}", "8", "3",
                               "--wait-for", str(go)], stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    time.sleep(1.0)
    go.touch()
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    merged = read_index(s3_root)["shards"]
    assert len(merged) == 16 and len({i["raw_data"]["basename"] for i in merged}) == 16
    assert settled_ranges(s3_root) == [rng(0, 80, topic="raw.p0"), rng(0, 80, topic="raw.p1")]
    assert len(list(TailReader(s3_root).samples(timeout_s=0))) == 48


OTHER = textwrap.dedent("""
    import os, sys
    from streams.events import OffsetRange
    from streams.mds import LiveStreamWriter
    sys.path.insert(0, os.path.dirname(sys.argv[2]))
    import mds_workload
    w = LiveStreamWriter(sys.argv[1], writer_id="w0", manifest={"vocab_version": sys.argv[3]}, orphan_grace_s=0)
    if sys.argv[4] == "publish":
        w.write_shard(mds_workload.make_samples("a", 0, 4), domain="web",
                      settled=[OffsetRange(topic="raw.w0", partition=0, start=0, end=10)])
""")


def other_process(root: str, action: str) -> None:
    """A second process starts as writer ``w0`` (orphan grace 0) and, for "publish", commits
    samples a-0-* settling raw.w0 [0, 10)."""
    r = subprocess.run([sys.executable, "-c", OTHER, root, str(HELPER), MANIFEST["vocab_version"], action],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def racing(monkeypatch, when, action) -> None:
    """Run ``action()`` once, just before the first ``ObjectRoot.put`` whose key satisfies ``when``."""
    put, armed = storage.ObjectRoot.put, [True]

    def racing_put(self, rel, data, **kw):
        if armed and when(rel):
            armed.clear()
            action()
        return put(self, rel, data, **kw)

    monkeypatch.setattr(storage.ObjectRoot, "put", racing_put)


def tail(root: str) -> tuple[list[str], list[str]]:
    bad: list[str] = []
    got = [s["id"] for s in TailReader(root, on_corrupt=lambda n, r: bad.append(r), read_attempts=1).samples(timeout_s=0)]
    return got, bad


def test_a_committed_shard_object_is_never_overwritten(s3_root, monkeypatch):
    """C2: B has read w0's state; another process claims w0 and commits the same batch before B
    uploads. B's upload goes to a fresh key (If-None-Match), so the committed object is intact."""
    with writer(s3_root, "w0") as b:
        racing(monkeypatch, lambda rel: ".mds" in rel, lambda: other_process(s3_root, "publish"))
        with pytest.raises(storage.PreconditionFailed, match="another process"):
            b.write_shard(workload.make_samples("bb", 0, 5), domain="web", settled=[rng(0, 10, topic="raw.w0")])
        monkeypatch.undo()
    got, bad = tail(s3_root)
    assert bad == [] and got == [f"a-0-{i}" for i in range(4)]
    assert settled_ranges(s3_root) == [rng(0, 10, topic="raw.w0")]
    store = storage.object_root(s3_root)
    (info,) = wl.read_state(store, "w0").index["shards"]
    key = f"writers/w0/{info['zip_data']['basename']}"
    assert info["zip_data"]["basename"].count("/") == 1  # <attempt>/<name>.mds.zstd
    with pytest.raises(storage.PreconditionFailed):
        store.put(key, b"overwrite", if_version=None)


def test_a_second_process_with_the_same_writer_id_fences_the_first(s3_root, monkeypatch):
    """C1: B starts as w0 while A's shard is uploaded but not committed. B's claim fences A (its
    commit and every later one fail, clearly); B's sweep may then drop A's upload safely."""
    with writer(s3_root, "w0") as a:
        racing(monkeypatch, lambda rel: "w0/log/" in rel, lambda: other_process(s3_root, "start"))  # before A's commit
        with pytest.raises(storage.WriterFenced, match="another process started with this writer id"):
            a.write_shard(workload.make_samples("w0", 0, 4), domain="web", settled=[rng(0, 10, topic="raw.w0")])
        monkeypatch.undo()
        with pytest.raises(storage.WriterFenced):
            a.write_shard(workload.make_samples("w0", 1, 4), domain="web", settled=[rng(10, 20, topic="raw.w0")])
        with pytest.raises(storage.WriterFenced):
            a.write_shard([], domain="web", settled=[rng(20, 30, topic="raw.w0")])
    assert settled_ranges(s3_root) == [] and read_index(s3_root)["shards"] == []
    assert not any(".mds" in n for n in keys(s3_root))  # B's sweep removed the uncommitted upload


def test_unknown_put_outcomes_neither_delete_nor_misreport(s3_root, monkeypatch):
    """H2: (a) the commit times out but lands later: the upload must still be there; (b) the commit
    lands, its response is lost and the retry gets 412: that is our own write, not a rival."""
    put, delayed = storage.ObjectRoot.put, []

    def timing_out_put(self, rel, data, **kw):
        if "w0/log/" in rel and not delayed:  # the commit: this writer's next log record
            delayed.append(lambda: put(self, rel, data, **kw))
            raise TimeoutError("read timeout")
        return put(self, rel, data, **kw)

    def lost_response_put(self, rel, data, **kw):
        if "w0/log/" in rel:
            put(self, rel, data, **kw)  # lands; the response is lost and the client retries
        return put(self, rel, data, **kw)

    with writer(s3_root, "w0") as w:
        monkeypatch.setattr(storage.ObjectRoot, "put", timing_out_put)
        with pytest.raises(TimeoutError):
            w.write_shard(workload.make_samples("w0", 0, 4), domain="web", settled=[rng(0, 10, topic="raw.w0")])
        delayed[0]()  # the PUT lands after the writer gave up on it
        monkeypatch.setattr(storage.ObjectRoot, "put", lost_response_put)
        ev = w.write_shard(workload.make_samples("w0", 1, 4), domain="web", settled=[rng(10, 20, topic="raw.w0")])
        assert ev.samples == 4
    got, bad = tail(s3_root)
    assert bad == [] and sorted(got) == sorted(f"w0-{k}-{i}" for k in range(2) for i in range(4))
    assert settled_ranges(s3_root) == [rng(0, 20, topic="raw.w0")]


def test_threads_share_one_writer(s3_root):
    """H4: the Beam sink shares one writer across threads; their publishes must not fence each other."""
    errors: list[BaseException] = []

    def run(w: LiveStreamWriter, t: int) -> None:
        for k in range(3):
            try:
                w.write_shard(workload.make_samples(f"t{t}", k, 2), domain="web",
                              settled=[rng(k * 10, k * 10 + 10, topic=f"raw.t{t}")])
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    with writer(s3_root, "w0") as w:
        threads = [threading.Thread(target=run, args=(w, t)) for t in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert errors == []
    assert len(read_index(s3_root)["shards"]) == 6


def test_a_large_conditional_put_keeps_its_precondition(s3_root, monkeypatch):
    """C3: s3fs goes multipart at 2 x 50 MiB and drops If-Match there; conditional puts stay single
    PUTs, and a body over the single-PUT limit is refused rather than written unconditionally."""
    store = storage.object_root(s3_root)
    store.put("big.json", b"{}", if_version=None)
    with pytest.raises(storage.PreconditionFailed):
        store.put("big.json", bytes(100 * 2**20 + 1), if_version='"0123456789abcdef0123456789abcdef"')
    assert store.read("big.json") == b"{}"
    monkeypatch.setattr(storage, "SINGLE_PUT_LIMIT", 1024)
    with pytest.raises(ValueError, match="single-PUT limit"):
        store.put("big.json", bytes(2048), if_version=store.version("big.json"))
    assert store.read("big.json") == b"{}"


def inject(monkeypatch, store: storage.ObjectRoot, method: str, fault) -> None:
    """Faults moto cannot produce: the botocore client's ``method`` raises ``fault(kwargs)`` when
    that is an exception (s3fs then handles it as it would a real one)."""
    client = store.fs.s3
    real = getattr(client, method)

    @functools.wraps(real)
    async def faulty(**kwargs):
        err = fault(kwargs)
        if err is not None:
            raise err
        return await real(**kwargs)

    monkeypatch.setattr(client, method, faulty)


def test_409_conflicts_are_retried_like_a_lost_cas(s3_root, monkeypatch):
    """H1: S3 answers 409 ConditionalRequestConflict to concurrent conditional writes; the first put
    of the writer index and of the merged index each get one, and the publish still succeeds."""
    from botocore.exceptions import ClientError

    seen: set[str] = set()

    def conflict_once(kw):
        if kw["Key"].endswith("index.json") and kw["Key"] not in seen:
            seen.add(kw["Key"])
            return ClientError({"Error": {"Code": "ConditionalRequestConflict",
                                          "Message": "A conflicting conditional operation is in progress"},
                                "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject")
        return None

    with writer(s3_root, "w0") as w:
        inject(monkeypatch, storage.object_root(s3_root), "put_object", conflict_once)
        w.write_shard(workload.make_samples("w0", 0, 4), domain="web", settled=[rng(0, 10, topic="raw.w0")])
    assert len(seen) == 2
    assert len(read_index(s3_root)["shards"]) == 1
    assert settled_ranges(s3_root) == [rng(0, 10, topic="raw.w0")]


def test_a_missing_bucket_fails_fast_and_network_errors_are_retried(s3_root, monkeypatch):
    """M1: a missing bucket is a clear error at construction, not an empty stream; a dropped
    connection during a poll or a shard read is retried, not fatal."""
    from botocore.exceptions import EndpointConnectionError

    missing = "s3://no-such-bucket-headwater/stream"
    t0 = time.monotonic()
    with pytest.raises(storage.StoreUnavailable, match="does not exist"):
        writer(missing, "w0")
    with pytest.raises(storage.StoreUnavailable):
        TailReader(missing)
    with pytest.raises(storage.StoreUnavailable):
        settled_ranges(missing)
    assert time.monotonic() - t0 < 10
    publish(s3_root, "w0", 1)
    reader = TailReader(s3_root, retry_backoff_s=0.01)
    head_down, shard_gets = [True], []

    def drop_head(kw):
        return EndpointConnectionError(endpoint_url="http://127.0.0.1:1") if head_down else None

    def drop_first_shard_get(kw):
        if ".mds" in kw["Key"]:
            shard_gets.append(kw["Key"])
            if len(shard_gets) == 1:
                return EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return None

    store = storage.object_root(s3_root)
    inject(monkeypatch, store, "head_object", drop_head)
    inject(monkeypatch, store, "get_object", drop_first_shard_get)
    assert reader.poll() == []  # the index HEAD fails: try again at the next poll
    head_down.clear()
    assert [s["id"] for s in reader.samples(timeout_s=0)] == [f"w0-0-{i}" for i in range(4)]
    assert len(shard_gets) == 2  # the shard read failed once and was retried
    assert reader.transient_errors >= 1


def test_train_launch_keeps_object_store_roots(tmp_path):
    """L2: ``headwater train --stream-root s3://…`` passes the URL through, not /cwd/s3:/…."""
    import argparse

    from trainer.launch import build_command

    args = argparse.Namespace(run_dir=str(tmp_path / "run"), stream_root=["s3://b/x/", "rel/local"], nproc=1,
                              config="debug_cpu", lock_wait_s=1.0, steps=None, checkpoint_every=None, bootstrap="",
                              tp=1, mixing=None, vocab_size=None, no_wandb=True)
    cmd = build_command(args, [])
    assert cmd[cmd.index("--dataloader.stream_roots") + 1] == f"s3://b/x,{os.path.abspath('rel/local')}"
