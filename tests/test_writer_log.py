"""The object-store writer log (streams/writer_log.py) against moto's S3 server on 127.0.0.1: a
publish is one LIST per writer plus the shard upload and one conditional create, whatever the
history; readers see commits before any merge; a reader that fell behind a fold and a log GC
re-reads and neither misses nor repeats a shard; a lost sequence number is re-checked, never
double-committed; a corrupt record is refused with its key; a stock reader sees everything
once the writer closed (or after ``fold_root``)."""

from __future__ import annotations

import collections
import copy

import pytest
from conftest import S3_BUCKET

from streams import manifest as mf
from streams import storage
from streams import writer_log as wl
from streams.events import OffsetRange
from streams.mds import LiveStreamWriter, read_index, settled_ranges
from streams.mds_reader import IndexWatcher
from streams.vocab import Vocab

MANIFEST = {"vocab_version": Vocab.default().version, "pipeline_version": "test@1"}


def rng(start: int, end: int, topic: str = "raw.w") -> OffsetRange:
    return OffsetRange(topic=topic, partition=0, start=start, end=end)


def samples(k: int, n: int = 2) -> list[dict]:
    return [{"id": f"s-{k}-{i}", "modality": "text", "tokens": [1, 2, 3, k % 100], "source": "src", "license": "cc0"}
            for i in range(n)]


def writer(root: str, writer_id: str = "w", **kw) -> LiveStreamWriter:
    return LiveStreamWriter(root, writer_id=writer_id, manifest=MANIFEST, vocab_size=Vocab.default().size, **kw)


def seed(root: str, n: int) -> None:
    """A second writer prefix ("seed") whose base lists ``n`` shards (clones of one real publish)."""
    with writer(root, "tpl") as w:
        pub = w.write_shard(samples(0), domain="web", settled=[rng(0, 1, topic="raw.tpl")])
    store = storage.object_root(root)
    state = wl.read_state(store, "tpl")
    infos, entries = [], {}
    for i in range(n):
        info = copy.deepcopy(state.index["shards"][0])
        name = f"web.seed.{i:016x}"
        info["raw_data"]["basename"] = f"x/{name}.mds"
        info["zip_data"]["basename"] = f"x/{name}.mds.zstd"
        infos.append(info)
        entries[name] = {**state.side["shards"][pub.shard], "writer_id": "seed",
                         "settled": mf.ranges_to_json([rng(10 * i, 10 * i + 10, topic="raw.seed")])}
    side = {**mf.empty_sidecar(), "vocab_version": MANIFEST["vocab_version"], "shards": entries}
    store.put("writers/seed/headwater.json", storage.json_bytes(side))
    store.put("writers/seed/index.json", storage.json_bytes({"version": 2, "shards": infos}))
    wl.merge_index(store)


class Requests:
    """(operation, key) of every S3 request the process's client sends (botocore events)."""

    def __init__(self, store: storage.ObjectRoot):
        self.calls: list[tuple[str, str]] = []
        store.fs.s3.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, params, model, **_):
        self.calls.append((model.name, params.get("Key") or params.get("Prefix") or ""))

    def take(self) -> list[tuple[str, str]]:
        out, self.calls = self.calls, []
        return out


@pytest.mark.parametrize("history", [0, 3000])
def test_a_publish_costs_the_same_requests_whatever_the_history(s3_root, history):
    seed(s3_root, history)
    with writer(s3_root, fold_interval_s=1e9) as w:
        w.write_shard(samples(0), domain="web", settled=[rng(0, 10)])  # the first sync reads every writer once
        requests = Requests(storage.object_root(s3_root))
        w.write_shard(samples(1), domain="web", settled=[rng(10, 20)])
        calls = requests.take()
    ops = collections.Counter(op for op, _ in calls)
    # 1 LIST of the writer prefixes, 1 LIST per writer's log (w, tpl, seed), the upload, the commit,
    # a HEAD of the record before it (a stalled zombie cannot commit into a deleted slot)
    assert ops == {"ListObjectsV2": 4, "PutObject": 2, "HeadObject": 1}, calls
    assert not any(key.endswith(".json") and "/log/" not in key for _, key in calls)  # no index/sidecar read


def test_readers_see_commits_before_any_merge_and_stock_readers_after_close(s3_root, tmp_path):
    watcher = IndexWatcher(s3_root)
    assert watcher.poll() == []
    w = writer(s3_root, fold_interval_s=1e9)
    names = [w.write_shard(samples(k), domain="web", settled=[rng(10 * k, 10 * k + 10)]).shard for k in range(3)]
    store = storage.object_root(s3_root)
    assert store.root_index()[0]["shards"] == []  # no fold due yet: the merged index lags ...
    assert [e.name for e in watcher.poll()] == names  # ... readers of the log do not
    assert [mf.shard_name_of(i) for i in read_index(s3_root)["shards"]] == names
    assert settled_ranges(s3_root) == [rng(0, 30)]
    w.__exit__(None, None, None)  # close folds and merges
    assert [mf.shard_name_of(i) for i in store.root_index()[0]["shards"]] == names
    assert watcher.poll() == []  # the merge moved nothing a reader already had


def test_the_fold_policy_folds_by_root_size_and_gc_keeps_the_newest_record(s3_root, monkeypatch):
    monkeypatch.setattr(wl, "LOG_GRACE_S", 0.0)
    watcher = IndexWatcher(s3_root)
    store = storage.object_root(s3_root)
    seen: list[str] = []
    with writer(s3_root, fold_interval_s=1e9) as w:
        for k in range(20):  # FOLD_MIN = 8 records per fold on a small root
            w.write_shard(samples(k), domain="web", settled=[rng(10 * k, 10 * k + 10)])
            if k in (3, 17):
                seen += [e.name for e in watcher.poll()]
        left = [seq for seq, _ in wl.collect_log(store, "w", 0)]
        base_seq = store.writer_index("w")[0][wl.LOG_KEY]
    assert base_seq >= 17 and min(left) > 8  # folded twice; covered records deleted ...
    assert max(left) == wl.read_state(store, "w").seq  # ... never the newest
    seen += [e.name for e in watcher.poll()]  # behind two folds and a GC: re-reads, no dup, no miss
    assert len(seen) == len(set(seen)) == 20
    assert seen == [mf.shard_name_of(i) for i in store.root_index()[0]["shards"]]


def test_a_lost_sequence_number_is_rechecked_not_double_committed(s3_root):
    """Another process commits this writer's next seq first (a zombie before its fence): the
    writer re-reads, sees that record settled the same offsets, and reports the replay."""
    with writer(s3_root) as w:
        w.write_shard(samples(0), domain="web", settled=[rng(0, 10)])
        store = storage.object_root(s3_root)
        state = wl.read_state(store, "w")
        info = copy.deepcopy(state.index["shards"][0])
        info["raw_data"]["basename"] = "0123456789abcdef/web.w.zombie.mds"
        info["zip_data"]["basename"] = "0123456789abcdef/web.w.zombie.mds.zstd"
        entry = {**state.side["shards"][mf.shard_name_of(state.index["shards"][0])],
                 "settled": mf.ranges_to_json([rng(10, 20)])}
        assert wl.append(store, state, {"kind": "shard", "owner": state.owner, "name": "web.w.zombie",
                                        "info": info, "entry": entry})
        ev = w.write_shard(samples(1), domain="web", settled=[rng(10, 20)])
    assert ev.shard == "web.w.zombie"  # the replay, not a second commit of offsets 10-20
    assert settled_ranges(s3_root) == [rng(0, 20)]
    assert len(read_index(s3_root)["shards"]) == 2


def test_a_corrupt_log_record_is_refused_with_its_key(s3_root, caplog):
    with writer(s3_root, fold_interval_s=1e9) as w:
        w.write_shard(samples(0), domain="web", settled=[rng(0, 10)])
        store = storage.object_root(s3_root)
        seq = wl.read_state(store, "w").seq + 1
        store.put(wl.log_key("w", seq), b'{"seq": %d, "kind": "shard", "owner": "x"}' % seq, if_version=None)
        assert IndexWatcher(s3_root).poll() == []  # a reader logs it and retries at the next poll
        assert "corrupt log record" in caplog.text and f"{seq:012d}" in caplog.text
        with pytest.raises(ValueError, match="corrupt log record"):
            w.write_shard(samples(1), domain="web", settled=[rng(10, 20)])
        store.delete(wl.log_key("w", seq))


def test_fold_root_merges_what_a_crashed_writer_left(s3_root, tmp_path):
    w = writer(s3_root, fold_interval_s=1e9)
    for k in range(3):
        w.write_shard(samples(k), domain="web", settled=[rng(10 * k, 10 * k + 10)])
    store = storage.object_root(s3_root)
    assert store.root_index()[0]["shards"] == []
    assert mf.fold_root(s3_root, interval_s=3600)  # never merged: due at once (what an idle job calls)
    w.write_shard(samples(3), domain="web", settled=[rng(30, 40)])
    del w  # a crash: no close, the last commit not merged
    assert len(store.root_index()[0]["shards"]) == 3
    assert not mf.fold_root(s3_root, interval_s=3600)  # merged a moment ago: not due
    assert mf.fold_root(s3_root, interval_s=0)
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=s3_root, local=str(tmp_path / "c"), batch_size=1, shuffle=False)
    assert sorted(ds[i]["id"] for i in range(len(ds))) == sorted(f"s-{k}-{i}" for k in range(4) for i in range(2))
    assert S3_BUCKET in s3_root


def fake_shard(state: wl.WriterState, name: str, start: int) -> tuple[dict, dict]:
    """An index entry and sidecar entry for a record that another process commits by hand."""
    info = copy.deepcopy(state.index["shards"][0])
    info["raw_data"]["basename"] = f"{'ab' * 8}/{name}.mds"
    info["zip_data"]["basename"] = f"{'ab' * 8}/{name}.mds.zstd"
    entry = {**next(iter(state.side["shards"].values())), "settled": mf.ranges_to_json([rng(start, start + 10)])}
    return info, entry


def test_a_zombie_stalled_past_a_claim_fold_and_gc_is_fenced_not_committed(s3_root, monkeypatch):
    """Z syncs at seq n and stalls in its upload; meanwhile P claims the id, commits, folds,
    merges and deletes the covered records n+1.. (the grace passed). Z's create of n+1 then wins
    a slot that was committed and deleted: the record before it is gone and the base does not
    hold Z's record, so Z deletes it and is fenced instead of reporting a publish nobody sees."""
    z = writer(s3_root, fold_interval_s=1e9)
    z.write_shard(samples(0), domain="web", settled=[rng(0, 10)])
    store = storage.object_root(s3_root)
    upload = storage.ObjectRoot.upload_shard

    def stalled_upload(self, *a, **kw):
        out = upload(self, *a, **kw)
        monkeypatch.setattr(wl, "LOG_GRACE_S", 0.0)
        st = wl.read_state(store, "w")
        assert wl.append(store, st, {"kind": "claim", "owner": "P", "at": 0})
        for k in range(3):
            info, entry = fake_shard(st, f"web.w.p{k}", 100 + 10 * k)
            assert wl.append(store, st, {"kind": "shard", "owner": "P", "name": f"web.w.p{k}", "info": info, "entry": entry})
        folded = wl.fold(store, "w", "P")
        wl.merge_index(store)
        assert wl.gc_log(store, "w", folded.seq) > 0
        return out

    monkeypatch.setattr(storage.ObjectRoot, "upload_shard", stalled_upload)
    with pytest.raises(storage.WriterFenced):
        z.write_shard(samples(1), domain="web", settled=[rng(10, 20)])
    monkeypatch.undo()
    assert settled_ranges(s3_root) == [rng(0, 10), rng(100, 130)]
    assert [s for s, _ in wl.collect_log(store, "w", 0)] == [wl.read_state(store, "w").seq]  # the void record is gone


def test_the_outbox_resends_events_a_dead_process_never_delivered(s3_root):
    sent: list[str] = []

    def flaky(event) -> None:
        if event.shard.endswith("fail") or "broken" in sent:
            raise ConnectionError("broker down")
        sent.append(event.shard)

    w = writer(s3_root, publisher=flaky, fold_interval_s=1e9)
    ok = w.write_shard(samples(0), domain="web", settled=[rng(0, 10)], name="w-ok")
    with pytest.raises(ConnectionError):
        w.write_shard(samples(1), domain="web", settled=[rng(10, 20)], name="w-fail")
    w._fold_remote()  # a fold records the outbox watermark below the undelivered event
    sent.append("broken")
    with pytest.raises(ConnectionError):
        w.write_shard(samples(2), domain="web", settled=[rng(20, 30)], name="w-late")
    del w  # dies: web.w.late was committed, its event never delivered
    resent: list[str] = []
    with writer(s3_root, publisher=lambda ev: resent.append(ev.shard)):
        pass
    assert sent[0] == ok.shard and resent == ["w-fail", "w-late"]  # each undelivered one, in order
    again: list[str] = []
    with writer(s3_root, publisher=lambda ev: again.append(ev.shard)):
        pass
    assert again == []  # delivered now: not sent a third time


def test_one_corrupt_writer_does_not_stop_readers_or_merges_of_the_others(s3_root, caplog):
    with writer(s3_root, "good", fold_interval_s=1e9) as good, writer(s3_root, "bad", fold_interval_s=1e9) as bad:
        good.write_shard(samples(0), domain="web", settled=[rng(0, 10, topic="raw.good")])
        bad.write_shard(samples(1), domain="web", settled=[rng(0, 10, topic="raw.bad")])
        store = storage.object_root(s3_root)
        wl.merge_index(store)
        watcher = IndexWatcher(s3_root)
        assert len(watcher.poll()) == 2
        seq = wl.read_state(store, "bad").seq + 1
        store.put(wl.log_key("bad", seq), b"\xff not json", if_version=None)
        good.write_shard(samples(2), domain="web", settled=[rng(10, 20, topic="raw.good")])
        assert [e.name for e in watcher.poll()] != []  # the good writer's new shard still arrives
        assert wl.merge_index(store) == 1  # the good writer's shard merged; the bad one's kept as merged
        assert len(store.root_index()[0]["shards"]) == 3
        assert "corrupt log record" in caplog.text
        store.delete(wl.log_key("bad", seq))


def test_a_record_that_points_outside_its_writer_is_refused(s3_root, caplog):
    with writer(s3_root, fold_interval_s=1e9) as w:
        w.write_shard(samples(0), domain="web", settled=[rng(0, 10)])
        store = storage.object_root(s3_root)
        state = wl.read_state(store, "w")
        info, entry = fake_shard(state, "web.w.evil", 50)
        info["raw_data"]["basename"] = "../../../../tmp/web.w.evil.mds"
        assert wl.append(store, state, {"kind": "shard", "owner": state.owner, "name": "web.w.evil",
                                        "info": info, "entry": entry})
        assert "web.w.evil" not in [e.name for e in IndexWatcher(s3_root).poll()]
        assert "is not <attempt>/web.w.evil.mds" in caplog.text
        store.delete(wl.log_key("w", state.seq))


def test_ranks_that_poll_at_different_times_split_an_s3_root_exactly(s3_root):
    """Only each writer's order is the same for every reader of an object-store root; ranks that
    see two writers' shards interleaved differently (one polls after every publish, the other once
    after a merge) still own disjoint sets covering every shard, spread over both ranks."""
    from trainer.data.buffers import StreamBuffers

    ranks = [StreamBuffers([s3_root], dp_rank=r, dp_world=2) for r in range(2)]
    try:
        with writer(s3_root, "a", fold_interval_s=1e9) as a, writer(s3_root, "b", fold_interval_s=1e9) as b:
            for k in range(6):
                (a if k % 3 else b).write_shard(samples(k), domain="web", settled=[rng(10 * k, 10 * k + 10, topic=f"raw.{k % 3 != 0}")])
                ranks[0]._poll(0)
        ranks[1]._poll(0)  # after the close's merge: the merged index's order, not rank 0's
        mine = [{name for (_, name), m in r._mine.items() if m} for r in ranks]
        assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == 6 and mine[0] and mine[1]
    finally:
        for r in ranks:
            r.close()
