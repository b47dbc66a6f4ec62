"""Live MDS streams: writer publishing, replay/overlap rules, tail reader cursor, corruption,
concurrent writers, and stock StreamingDataset reads of snapshots while another process appends."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.events import OffsetRange, ShardPublished, TokenizedSample
from streams.mds import (
    COLUMNS,
    LiveStreamWriter,
    OverlapError,
    TailReader,
    read_index,
    read_sidecar,
    sample_from_event,
    settled_ranges,
)
from streams.vocab import Vocab

HELPER = pathlib.Path(__file__).parent / "helpers" / "mds_workload.py"
_spec = importlib.util.spec_from_file_location("mds_workload", HELPER)
workload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(workload)

MANIFEST = {"vocab_version": Vocab.default().version, "tokenizer_version": "qwen-bpe@1",
            "discretizer_version": "encodec@1", "pipeline_version": "test@1"}


def rng(start: int, end: int, partition: int = 0, topic: str = "raw.text") -> OffsetRange:
    return OffsetRange(topic=topic, partition=partition, start=start, end=end)


def writer(root, writer_id="w0", **kw) -> LiveStreamWriter:
    return LiveStreamWriter(root, writer_id=writer_id, manifest=MANIFEST, vocab_size=Vocab.default().size, **kw)


def fill(root, shards=3, per=5, writer_id="w0", domain="web") -> list[str]:
    with writer(root, writer_id) as w:
        for k in range(shards):
            w.write_shard(workload.make_samples(writer_id, k, per), domain=domain,
                          settled=[rng(k * 10, k * 10 + 10, topic=f"raw.{writer_id}.{domain}")])
    return [f"{writer_id}-{k}-{i}" for k in range(shards) for i in range(per)]


def test_publish_is_visible_with_exact_content_and_lineage(tmp_path):
    events: list[ShardPublished] = []
    reader = TailReader(tmp_path)
    assert reader.poll() == []
    with writer(tmp_path, publisher=events.append) as w:
        ev = TokenizedSample(id="doc-1", domain="web", modality="text", tokens=Vocab.default().encode("héllo 🌊"),
                             source="crawl", license="cc-by", pipeline_version="test@1", language="fr",
                             tokenizer_version="qwen-bpe@1", lineage={"filters": "v3"})
        pub = w.write_shard([sample_from_event(ev)], domain="web", settled=[rng(0, 4)])
    assert events == [pub] and pub.samples == 1 and pub.vocab_version == MANIFEST["vocab_version"]
    assert ShardPublished.from_json(pub.to_json()) == pub
    assert reader.poll() == [pub.shard]
    (s,) = list(reader.samples(timeout_s=0))
    assert set(s) == set(COLUMNS) | {"_shard", "_index"}
    assert s["tokens"].dtype == np.int32 and Vocab.default().decode(s["tokens"]) == "héllo 🌊"
    assert (s["id"], s["domain"], s["language"], s["source"], s["license"]) == ("doc-1", "web", "fr", "crawl", "cc-by")
    assert s["lineage"] == {"filters": "v3", "tokenizer_version": "qwen-bpe@1"}
    side = read_sidecar(tmp_path)["shards"][pub.shard]
    assert side["manifest"]["discretizer_version"] == "encodec@1" and side["settled"][0]["end"] == 4
    assert os.path.isfile(tmp_path / f"{pub.shard}.mds.zstd")
    assert not os.listdir(tmp_path / ".staging")


def test_replay_is_a_noop_and_overlap_is_refused(tmp_path):
    with writer(tmp_path) as w:
        first = w.write_shard(workload.make_samples("w0", 0, 3), domain="web", settled=[rng(0, 10)])
        again = w.write_shard(workload.make_samples("w0", 0, 3), domain="web", settled=[rng(0, 10)])
        assert again == first and len(read_index(tmp_path)["shards"]) == 1
        with pytest.raises(OverlapError, match=r"\[5,15\) overlap \[0,10\)"):
            w.write_shard(workload.make_samples("w0", 1, 3), domain="web", settled=[rng(5, 15)])
        other_partition = w.write_shard(workload.make_samples("w0", 1, 3), domain="web", settled=[rng(5, 15, 1)])
        empty = w.write_shard([], domain="web", settled=[rng(10, 20)])  # all filtered: settled, no shard
        assert empty.samples == 0 and len(read_index(tmp_path)["shards"]) == 2
        assert w.settled() == [rng(0, 20), rng(5, 15, 1)]
        no_ranges = w.write_shard(workload.make_samples("w0", 2, 3), domain="web")
        assert w.write_shard(workload.make_samples("w0", 2, 3), domain="web") == no_ranges  # content-named
    assert other_partition.shard != first.shard
    with writer(tmp_path, "w1") as w1:  # a replay under another writer id is still a no-op
        assert w1.write_shard(workload.make_samples("w1", 0, 3), domain="web", settled=[rng(0, 10)]) == first
    assert len(read_index(tmp_path)["shards"]) == 3


def test_unpublished_sidecar_entry_does_not_count_as_settled(tmp_path):
    """A crash between the sidecar and index rewrites leaves an orphan entry: not settled, replayable."""
    fill(tmp_path, shards=1)
    side = read_sidecar(tmp_path)
    orphan = dict(next(iter(side["shards"].values())), settled=[{"topic": "raw.text", "partition": 0, "start": 50,
                                                                 "end": 60}])
    side["shards"]["web.w0.orphan"] = orphan
    (tmp_path / "headwater.json").write_text(json.dumps(side))
    assert rng(50, 60) not in settled_ranges(tmp_path)
    with writer(tmp_path) as w:
        pub = w.write_shard(workload.make_samples("w0", 9, 2), domain="web", settled=[rng(50, 60)])
    assert pub.shard != "web.w0.orphan" and rng(50, 60) in settled_ranges(tmp_path)


def test_published_shard_missing_from_sidecar_is_repaired_by_replay(tmp_path):
    """If a crash kept the index rename but lost the sidecar's, replaying the shard restores its ranges."""
    fill(tmp_path, shards=2)
    side = read_sidecar(tmp_path)
    lost = min(side["shards"])
    ranges = side["shards"].pop(lost)["settled"]
    (tmp_path / "headwater.json").write_text(json.dumps(side))
    assert len(settled_ranges(tmp_path, merge=False)) == 1
    k = int(ranges[0]["start"]) // 10
    with writer(tmp_path) as w:
        pub = w.write_shard(workload.make_samples("w0", k, 5), domain="web",
                            settled=[rng(ranges[0]["start"], ranges[0]["end"], topic=ranges[0]["topic"])])
    assert pub.shard == lost and len(read_index(tmp_path)["shards"]) == 2
    assert len(settled_ranges(tmp_path, merge=False)) == 2


@pytest.mark.parametrize("sample,match", [
    ({"modality": "text", "tokens": [1], "source": "s", "license": "l"}, "missing column 'id'"),
    ({"id": "a", "modality": "text", "tokens": [1], "source": "s", "license": "l", "colour": 1}, "unknown column"),
    ({"id": "a", "modality": "text", "tokens": [10**6], "source": "s", "license": "l"}, "token id 1000000 out of range"),
    ({"id": "a", "modality": "text", "tokens": [3, -1], "source": "s", "license": "l"}, "token id -1 out of range"),
    ({"id": "a", "modality": "text", "tokens": np.array([-5], np.int32), "source": "s", "license": "l"}, "id -5 out"),
    ({"id": "a", "modality": "text", "tokens": [2**40], "source": "s", "license": "l"}, "out of int32 range"),
    ({"id": "a", "modality": "text", "tokens": [[1]], "source": "s", "license": "l"}, "1-D integer"),
    ({"id": "a", "modality": "text", "tokens": [1.5], "source": "s", "license": "l"}, "1-D integer"),
    ({"id": "a", "modality": "text", "tokens": [1], "source": "s", "license": "l", "domain": "news"}, "differs"),
    ({"id": 7, "modality": "text", "tokens": [1], "source": "s", "license": "l"}, "'id' must be str"),
    ({"id": "a", "modality": "text", "tokens": [1], "source": "s", "license": "l", "lineage": "{"}, "lineage"),
])
def test_bad_samples_raise_clear_errors(tmp_path, sample, match):
    with writer(tmp_path) as w, pytest.raises(ValueError, match=match):
        w.write_shard([sample], domain="web")
    assert read_index(tmp_path)["shards"] == []


def test_bad_names_and_vocab_mismatch_raise(tmp_path):
    with pytest.raises(ValueError, match="writer_id"):
        writer(tmp_path, "bad/id")
    with writer(tmp_path) as w, pytest.raises(ValueError, match="domain"):
        w.write_shard(workload.make_samples("w0", 0, 1), domain="a.b")
    with pytest.raises(ValueError, match="vocab_version is required"):
        LiveStreamWriter(tmp_path, writer_id="w0", manifest={"pipeline_version": "x"})
    fill(tmp_path, shards=1)
    with (LiveStreamWriter(tmp_path, writer_id="w9", manifest={"vocab_version": "v1-other"}) as w,
          pytest.raises(ValueError, match="holds vocab")):
        w.write_shard(workload.make_samples("w9", 0, 1), domain="web")


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 7, 14, 15])
def test_tail_reader_resumes_without_repeat_or_skip(tmp_path, cut):
    expected = fill(tmp_path, shards=3, per=5)
    with TailReader(tmp_path) as r:
        it = r.samples(timeout_s=0)
        got = [next(it)["id"] for _ in range(cut)]
        state = json.loads(json.dumps(r.state_dict()))  # checkpoints store it as JSON
    with writer(tmp_path) as w:  # more shards arrive after the save
        w.write_shard(workload.make_samples("w0", 3, 5), domain="web", settled=[rng(30, 40, topic="raw.w0.web")])
    expected += [f"w0-3-{i}" for i in range(5)]
    with TailReader(tmp_path) as r2:
        r2.load_state_dict(state)
        got += [s["id"] for s in r2.samples(timeout_s=0)]
    assert got == expected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5), cuts=st.lists(st.integers(0, 8), max_size=4))
def test_tail_reader_survives_many_restarts(tmp_path_factory, sizes, cuts):
    """Stop after a few samples, restore into a fresh reader, repeat; shards keep arriving."""
    root = tmp_path_factory.mktemp("root")
    expected, got, state = [], [], None
    with writer(root) as w:
        for k, n in enumerate(sizes):
            w.write_shard(workload.make_samples("w0", k, n), domain="web")
            expected += [f"w0-{k}-{i}" for i in range(n)]
            for cut in (cuts[k:k + 1] or [0]):
                with TailReader(root) as r:
                    if state is not None:
                        r.load_state_dict(state)
                    it = r.samples(timeout_s=0)
                    got += [s["id"] for _, s in zip(range(cut), it)]  # range first: zip must not pull an extra sample
                    state = r.state_dict()
    with TailReader(root) as r:
        r.load_state_dict(state)
        got += [s["id"] for s in r.samples(timeout_s=0)]
    assert got == expected


def test_tail_reader_follows_a_writer_thread_and_wakes_on_notify(tmp_path):
    expected = [f"w0-{k}-{i}" for k in range(6) for i in range(4)]
    reader = TailReader(tmp_path, poll_interval_s=5.0)  # only notify() can make this fast

    def produce():
        with writer(tmp_path, publisher=reader.notify) as w:
            for k in range(6):
                w.write_shard(workload.make_samples("w0", k, 4), domain="web")
                time.sleep(0.05)

    t = threading.Thread(target=produce)
    start = time.monotonic()
    t.start()
    got = []
    for s in reader.samples(timeout_s=None):
        got.append(s["id"])
        if len(got) == len(expected):
            break
    t.join()
    assert got == expected and time.monotonic() - start < 4.0
    reader.close()


def test_domains_filter_and_quarantine(tmp_path):
    web = fill(tmp_path, shards=2, per=3, domain="web")
    fill(tmp_path, shards=2, per=3, domain="code")
    assert [s["id"] for s in TailReader(tmp_path, domains=["web"]).samples(timeout_s=0)] == web
    index = [n["raw_data"]["basename"][:-4] for n in read_index(tmp_path)["shards"]]
    r = TailReader(tmp_path, exclude_shards=[index[0]])
    it = r.samples(timeout_s=0)
    first = next(it)
    assert first["_shard"] == index[1]
    r.exclude([index[1]])  # quarantined mid-shard: the rest of it is skipped
    rest = [s["_shard"] for s in it]
    assert set(rest) == set(index[2:]) and len(rest) == 6


def test_corrupt_and_missing_shards_are_reported_and_skipped(tmp_path):
    expected = fill(tmp_path, shards=4, per=3)
    names = [n["raw_data"]["basename"][:-4] for n in read_index(tmp_path)["shards"]]
    bad = tmp_path / f"{names[1]}.mds.zstd"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    os.remove(tmp_path / f"{names[2]}.mds.zstd")
    reported: list[tuple[str, str]] = []
    r = TailReader(tmp_path, on_corrupt=lambda n, why: reported.append((n, why)))
    got = [s["id"] for s in r.samples(timeout_s=0)]
    assert got == expected[:3] + expected[9:]
    assert [n for n, _ in reported] == [names[1], names[2]]
    assert "hash mismatch" in reported[0][1] and "cannot read" in reported[1][1]
    assert r.state_dict()["corrupt"] == sorted(names[1:3])


def test_a_shard_whose_basename_leaves_the_root_is_corrupt_not_read(tmp_path):
    """Index entries name files by basename; one with ``..`` (or absolute) is reported as corrupt
    and never read or written outside the root and the reader's cache."""
    from streams.manifest import fold_root, write_root

    expected = fill(tmp_path / "root", shards=2, per=3)
    root = tmp_path / "root"
    fold_root(str(root), force=True)
    index, side = read_index(root), read_sidecar(root)
    evil = json.loads(json.dumps(index["shards"][1]))
    (tmp_path / "outside.mds.zstd").write_bytes((root / evil["zip_data"]["basename"]).read_bytes())
    evil["zip_data"]["basename"] = "../outside.mds.zstd"
    write_root(str(root), {"shards": [index["shards"][0], evil]}, side)
    reported: list[tuple[str, str]] = []
    got = [s["id"] for s in TailReader(root, on_corrupt=lambda n, why: reported.append((n, why))).samples(timeout_s=0)]
    assert got == expected[:3]
    assert len(reported) == 1 and "leaves the root" in reported[0][1]


def test_two_writer_threads_share_a_root(tmp_path):
    threads = [threading.Thread(target=fill, args=(tmp_path,), kwargs={"shards": 8, "per": 2, "writer_id": f"t{i}"})
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_index(tmp_path)["shards"]) == 16 and len(read_sidecar(tmp_path)["shards"]) == 16
    assert len(list(TailReader(tmp_path).samples(timeout_s=0))) == 32


def test_stock_streaming_dataset_reads_snapshots_while_two_processes_append(tmp_path):
    """Two writer processes append concurrently; a third reads snapshot after snapshot with a
    stock StreamingDataset (every sample checked). The final index holds every shard (without
    the root lock about a third of the shards are lost in this workload)."""
    root, go, done, ready = tmp_path / "root", tmp_path / "go", tmp_path / "done", tmp_path / "ready"
    root.mkdir()
    py, env = sys.executable, {**os.environ, "PYTHONWARNINGS": "ignore"}
    reader = subprocess.Popen([py, str(HELPER), "snapshots", str(root), "--until", str(done), "--ready", str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    writers = [subprocess.Popen([py, str(HELPER), "append", str(root), f"p{i}", "30", "5", "--sleep", "0.15",
                                 "--wait-for", str(go)], stderr=subprocess.PIPE, text=True, env=env)
               for i in range(2)]
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline and reader.poll() is None:
        time.sleep(0.05)
    go.touch()
    for p in writers:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    done.touch()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err[-3000:]
    snaps = [json.loads(line) for line in out.splitlines()]
    counts = [s["samples"] for s in snaps]
    assert counts == sorted(counts) and counts[-1] == 2 * 30 * 5
    assert len({c for c in counts if 0 < c < 300}) >= 3, f"too few snapshots during appends: {counts}"
    assert len(read_index(root)["shards"]) == 60 and len(read_sidecar(root)["shards"]) == 60
    assert settled_ranges(root) == [rng(0, 300, topic="raw.p0"), rng(0, 300, topic="raw.p1")]
