"""Takedown on an object-store root (moto's S3 server on 127.0.0.1, configured only through the
standard AWS variables): two writers publish shards mixing two sources, `headwater takedown` of
one; a stock StreamingDataset(remote=...) shows none of its samples and all of the other's, a
TailReader resumed mid-stream continues exactly, a live writer publishing during the takedown is
not fenced and loses nothing, and a crash between the writer-index put and the merged put is
repaired by the next refresh."""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid

import numpy as np
import pytest

from infra.cli import main as cli
from infra.takedown import takedown
from streams import faultpoints, storage
from streams import writer_log as wl
from streams.events import OffsetRange
from streams.governance import TAKEDOWN_REASON, denylist
from streams.mds import LiveStreamWriter, TailReader, read_index, read_sidecar, settled_ranges
from streams.mds_rewrite import remove_samples
from streams.vocab import Vocab

MANIFEST = {"vocab_version": Vocab.default().version, "pipeline_version": "test@1"}
GONE, KEPT = "web_news", "web"  # "web" is a prefix of "web_news": names must match exactly


def tokens(sample_id: str) -> np.ndarray:
    seed = sum(sample_id.encode()) * 31 + len(sample_id)
    return (np.arange(1 + seed % 23, dtype=np.int64) * 7 + seed) % 151_643


def sample(sample_id: str, source: str) -> dict:
    return {"id": sample_id, "modality": "text", "tokens": tokens(sample_id), "source": source,
            "license": "cc-by-sa" if source == GONE else "cc-by", "produced_at": 1.0}


def writer(root: str, writer_id: str, **kw) -> LiveStreamWriter:
    return LiveStreamWriter(root, writer_id=writer_id, manifest=MANIFEST, vocab_size=Vocab.default().size, **kw)


def publish(w: LiveStreamWriter, k: int, pattern: str) -> list[dict]:
    """Shard ``k`` of writer ``w``: one sample per letter of ``pattern`` (g: GONE, k: KEPT), settling
    raw.<writer> [10k, 10k+10)."""
    rows = [sample(f"{w.writer_id}-{k}-{i}", GONE if c == "g" else KEPT) for i, c in enumerate(pattern)]
    w.write_shard(rows, domain="web", settled=[OffsetRange(topic=f"raw.{w.writer_id}", partition=0,
                                                          start=10 * k, end=10 * k + 10)])
    return rows


#: Per writer, the shards' sample patterns: mixed, all of the source (emptied), none of it (untouched).
LAYOUT = {"w0": ["gkgk", "gg", "kkk"], "w1": ["kgkg", "kgk"]}


def populate(root: str) -> list[dict]:
    """Publish LAYOUT; the samples in stream (merged index) order."""
    out = []
    for writer_id, shards in LAYOUT.items():
        with writer(root, writer_id) as w:
            for k, pattern in enumerate(shards):
                out += publish(w, k, pattern)
    return out


def stock_ids(root: str, tmp_path) -> list[str]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(remote=root, local=str(tmp_path / f"cache-{uuid.uuid4().hex[:6]}"), shuffle=False,
                          batch_size=1)
    out = []
    for s in ds:
        assert np.array_equal(s["tokens"], tokens(s["id"]))
        out.append(s["id"])
    return out


def objects(root: str) -> list[str]:
    store = storage.object_root(root)
    return sorted(e["name"] for e in store.find(""))


def test_takedown_of_an_s3_root(s3_root, tmp_path):
    rows = populate(s3_root)
    kept = [r["id"] for r in rows if r["source"] == KEPT]
    settled_before = settled_ranges(s3_root)
    merged_before = [i["raw_data"]["basename"] for i in read_index(s3_root)["shards"]]
    store = storage.object_root(s3_root)
    owners = {w: (store.writer_index(w)[0]["owner"], store.writer_sidecar(w, {})[0]["owner"]) for w in LAYOUT}
    # a reader that consumed part of the stream: all of w0's shard 0, then 1 of the emptied shard
    reader = TailReader(s3_root)
    it = reader.samples(timeout_s=0)
    first = [s["id"] for s in itertools.islice(it, 5)]
    cursor = reader.state_dict()
    # and one that stopped inside w0's shard 0 (mixed: it is rewritten)
    inside = TailReader(s3_root)
    first_inside = [s["id"] for s in itertools.islice(inside.samples(timeout_s=0), 3)]
    cursor_inside = inside.state_dict()
    inside.close()

    assert cli(["takedown", "--source", GONE, "--stream-root", s3_root, "--reason", "test", "--by", "tester",
                "--delete-grace-s", "0"]) == 0

    assert stock_ids(s3_root, tmp_path) == kept  # none of the source, all of the other, in stream order
    assert settled_ranges(s3_root) == settled_before  # resume and replay checks keep working
    merged = read_index(s3_root)["shards"]
    after = [i["raw_data"]["basename"] for i in merged]
    # replacements at their predecessors' positions; the emptied shard dropped; the untouched kept
    assert len(after) == 4 and after[1] == merged_before[2]
    assert [b.split("/")[1] for b in after] == ["w0", "w0", "w1", "w1"]
    side = read_sidecar(s3_root)
    replaces = {side["shards"][b.rsplit("/", 1)[-1].removesuffix(".mds")].get("replaces") for b in after}
    assert replaces == {None} | {b.rsplit("/", 1)[-1].removesuffix(".mds") for b in
                                 (merged_before[0], merged_before[3], merged_before[4])}
    emptied = merged_before[1].rsplit("/", 1)[-1].removesuffix(".mds")
    assert side["settled_only"][emptied]["removed"] == [0, 1] and emptied not in side["shards"]
    # the old shard objects are gone; owner tokens kept (a takedown is not a new owner)
    shard_objects = [n for n in objects(s3_root) if ".mds" in n]
    assert len(shard_objects) == 4
    assert not any(b.rsplit("/", 1)[-1] in n for b in merged_before if b not in after for n in shard_objects)
    assert owners == {w: (store.writer_index(w)[0]["owner"], store.writer_sidecar(w, {})[0]["owner"]) for w in LAYOUT}
    # governance: the denylist, the audit record and the report are objects of the root
    assert GONE in denylist(s3_root) and KEPT not in denylist(s3_root)
    from beam_jobs.ingest import blocked_sources

    assert blocked_sources(s3_root, {}) == {GONE: TAKEDOWN_REASON}  # ingest into this root drops it
    started, audit = [n for n in objects(s3_root) if n.startswith("_governance/takedowns/")]
    assert started.endswith("-started.json") and audit.endswith("-finished.json")
    assert any(n.endswith(".txt") for n in objects(s3_root))
    record = json.loads(store.read(audit))
    assert record["samples_removed"] == 7 and len(record["files_deleted"]) == 4
    assert record["dlq_removed"] is None and record["writers_failed"] == {}
    # the dedup purge lists are objects in the root, read by every machine's index cache
    assert record["text_ids_purged"] == record["media_ids_purged"] == record["semantic_ids_purged"] == 7

    # the first reader, resumed from its cursor: continues exactly, no sample of the source
    resumed = TailReader(s3_root)
    resumed.load_state_dict(cursor)
    rest = [s["id"] for s in resumed.samples(timeout_s=0)]
    assert first == [r["id"] for r in rows[:5]]
    assert rest == [i for i in kept if i not in first]
    # the same reader object, still holding its generator: finishes the emptied shard from the copy
    # it loaded, then only kept samples; every kept sample exactly once
    live = first + [s["id"] for s in it]
    assert sorted(i for i in live if i in kept) == sorted(kept) and len(live) == len(set(live))
    assert {i for i in live if i not in kept} <= {r["id"] for r in rows[:6]}  # only from shards loaded before
    reader.close()
    # the reader that stopped inside a rewritten shard continues at the same kept sample
    resumed = TailReader(s3_root)
    resumed.load_state_dict(cursor_inside)
    rest = [s["id"] for s in resumed.samples(timeout_s=0)]
    assert first_inside == ["w0-0-0", "w0-0-1", "w0-0-2"]
    assert rest == [i for i in kept if i not in first_inside]
    # re-running is a no-op; the writers start again unfenced and publish on
    again = takedown(GONE, s3_root, delete_grace_s=0)
    assert again["samples_removed"] == 0
    with writer(s3_root, "w0") as w:
        publish(w, 3, "kk")
    assert stock_ids(s3_root, tmp_path) == kept + ["w0-3-0", "w0-3-1"]


def racing(monkeypatch, when, action) -> None:
    """Run ``action()`` in another thread (and wait for it) just before the first ``ObjectRoot.put``
    for which ``when(rel)`` holds."""
    put, armed = storage.ObjectRoot.put, [True]

    def racing_put(self, rel, data, **kw):
        if armed and when(rel):
            armed.clear()
            errors: list[BaseException] = []

            def run():
                try:
                    action()
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    errors.append(e)

            t = threading.Thread(target=run)
            t.start()
            t.join()
            if errors:
                raise errors[0]
        return put(self, rel, data, **kw)

    monkeypatch.setattr(storage.ObjectRoot, "put", racing_put)


def drop_gone(s: dict) -> bool:
    return s["source"] == GONE


def test_a_live_writer_edited_by_a_takedown_is_not_fenced(s3_root, monkeypatch):
    """The takedown commits w0's rewrite between the live writer's state read and its commit (its
    next log record), and again during the writer's fold: same owner, so the writer is not fenced;
    its record stays after the takedown's base and its fold re-reads and redoes."""
    with writer(s3_root, "w0") as w:
        rows = publish(w, 0, "gkgk")
        main = threading.current_thread()
        racing(monkeypatch, lambda rel: "w0/log/" in rel and threading.current_thread() is main,
               lambda: remove_samples(s3_root, drop_gone, delete_grace_s=0))
        rows += publish(w, 1, "kk")
        monkeypatch.undo()
        rows += publish(w, 2, "gk")
        racing(monkeypatch, lambda rel: rel.endswith("w0/headwater.json") and threading.current_thread() is main,
               lambda: remove_samples(s3_root, drop_gone, delete_grace_s=0))
        w._fold_remote()  # what close or the fold policy runs
        monkeypatch.undo()
        assert storage.object_root(s3_root).writer_index("w0")[0][wl.LOG_KEY] > 0
    ids = [s["id"] for s in TailReader(s3_root).samples(timeout_s=0)]
    assert ids == [r["id"] for r in rows if r["source"] == KEPT]
    assert len(settled_ranges(s3_root)) == 1 and settled_ranges(s3_root)[0].end == 30


def test_a_takedown_that_loses_to_a_live_publish_retries_it(s3_root, monkeypatch):
    """A live publish (of another sample of the source, too) lands between the takedown's sidecar
    put and its index put: it stays in the writer's log after the takedown's base, and the
    takedown's next round (it sees a newer record) rewrites it too. The
    publish's object is newer than the takedown's start (S3's LastModified has 1 s resolution: the
    sleep makes that certain), and is still deleted: this run unlisted it."""
    with writer(s3_root, "w0") as w:
        rows = publish(w, 0, "gkgk")
        takedown_thread = threading.current_thread()
        racing(monkeypatch, lambda rel: rel.endswith("w0/index.json") and threading.current_thread() is takedown_thread,
               lambda: (time.sleep(1.1), rows.extend(publish(w, 1, "gk"))))
        result = remove_samples(s3_root, drop_gone, delete_grace_s=0)
        monkeypatch.undo()
    assert sorted(r.id for r in result.removed) == ["w0-0-0", "w0-0-2", "w0-1-0"]
    ids = [s["id"] for s in TailReader(s3_root).samples(timeout_s=0)]
    assert ids == [r["id"] for r in rows if r["source"] == KEPT]
    assert not [n for n in objects(s3_root) if ".mds" in n and any(o in n for o in result.replaced)]


def test_a_live_writer_publishing_during_a_takedown_loses_nothing(s3_root):
    rows = populate(s3_root)
    published: list[dict] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def live() -> None:
        try:
            with writer(s3_root, "w1") as w:  # one of the writers being rewritten, claimed anew
                started.set()
                for k in range(2, 10):
                    published.extend(publish(w, k, "kgk"))
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)
            started.set()

    t = threading.Thread(target=live)
    t.start()
    started.wait(60)
    first = remove_samples(s3_root, drop_gone, delete_grace_s=0)
    t.join(120)
    assert errors == [] and not t.is_alive()
    second = remove_samples(s3_root, drop_gone, delete_grace_s=0)  # what the live writer published later
    assert first.removed and {r.source for r in first.removed + second.removed} == {GONE}
    ids = [s["id"] for s in TailReader(s3_root).samples(timeout_s=0)]
    assert len(published) == 24 and len(ids) == len(set(ids))
    assert set(ids) == {r["id"] for r in rows + published if r["source"] == KEPT}
    assert settled_ranges(s3_root)[-1] == OffsetRange(topic="raw.w1", partition=0, start=0, end=100)


class Crash(BaseException):
    """Stands in for a kill -9 at a fault point."""


def test_a_crash_between_the_writer_commit_and_the_merge_is_repaired(s3_root, monkeypatch, tmp_path):
    rows = populate(s3_root)
    kept = [r["id"] for r in rows if r["source"] == KEPT]
    before = [i["raw_data"]["basename"] for i in read_index(s3_root)["shards"]]
    reach = faultpoints.reach

    def crash_at_merge(name: str) -> None:
        if name == "remote.before_merge":
            raise Crash(name)
        reach(name)

    monkeypatch.setattr(faultpoints, "reach", crash_at_merge)
    with pytest.raises(Crash):
        remove_samples(s3_root, drop_gone, delete_grace_s=0)
    monkeypatch.undo()
    store = storage.object_root(s3_root)
    # w0 committed its rewrite; the merged index still lists w0's old shards, their objects are kept
    assert [i["raw_data"]["basename"] for i in store.root_index()[0]["shards"]] == before
    names = objects(s3_root)
    assert all(any(n.startswith(b) for n in names) for b in before)  # raw basename + ".zstd"
    assert len(store.writer_index("w0")[0]["shards"]) == 2
    # a log-reading view derives what the merge will write: the replacements at their positions
    derived = [i["raw_data"]["basename"] for i in read_index(s3_root)["shards"]]
    assert len(derived) == 4 and derived[1] == before[2] and before[1] not in derived
    # the next refresh (any writer's start or publish, or a takedown) repairs it
    with writer(s3_root, "w1"):
        pass
    after = [i["raw_data"]["basename"] for i in read_index(s3_root)["shards"]]
    assert len(after) == 4 and after[1] == before[2] and after[2:] == before[3:]
    assert after[0] != before[0] and before[1] not in after
    assert stock_ids(s3_root, tmp_path) == [i for i in kept if i.startswith("w0-")] + \
        [r["id"] for r in rows if r["id"].startswith("w1-")]
    # re-running the takedown finishes w1 and deletes the objects the crash left behind
    report = takedown(GONE, s3_root, delete_grace_s=0)
    assert report["samples_removed"] == 3 and report["files_deleted"] == 4
    assert stock_ids(s3_root, tmp_path) == kept
    assert len([n for n in objects(s3_root) if ".mds" in n]) == 4


def shard_bytes(root: str, key: str) -> bytes:
    """The uncompressed bytes of shard object ``key``."""
    import zstandard

    data = storage.object_root(root).read(key)
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 26) if key.endswith(".zstd") else data


def listed_objects_exist(root: str) -> None:
    """Every object the writers' indexes and the merged index list exists."""
    store = storage.object_root(root)
    present = set(objects(root))
    keys = [i["zip_data"]["basename"] for i in store.root_index()[0]["shards"]]
    for w in store.writers():
        keys += [f"writers/{w}/{i['zip_data']['basename']}" for i in store.writer_index(w)[0]["shards"]]
    assert keys and [k for k in keys if k not in present] == []


def test_a_writer_restart_during_a_takedown_loses_no_kept_sample(s3_root, tmp_path):
    """The writer restarts (claim, then its orphan sweep) while the takedown reads w0's shard 1:
    the sweep deletes the takedown's uncommitted replacement of shard 0. The takedown's commit
    loses its If-Match, sees new owner tokens and uploads its replacements again."""
    with writer(s3_root, "w0") as w:
        rows = publish(w, 0, "gkk") + publish(w, 1, "gkk")
    restarted = []

    def drop(s: dict) -> bool:
        if s["id"] == "w0-1-0" and not restarted:
            restarted.append(1)
            time.sleep(1.1)  # LastModified has 1 s resolution: the upload is older than the sweep's cutoff
            with writer(s3_root, "w0", orphan_grace_s=0.0):  # stands in for the 900 s grace elapsed
                pass
        return s["source"] == GONE

    result = remove_samples(s3_root, drop, delete_grace_s=0)
    assert restarted and len(result.replaced) == 2
    listed_objects_exist(s3_root)
    assert result.failed == {}
    assert stock_ids(s3_root, tmp_path) == [r["id"] for r in rows if r["source"] == KEPT]
    assert len([n for n in objects(s3_root) if ".mds" in n]) == 2  # no original, no superseded upload left


def test_one_broken_writer_prefix_does_not_stop_the_takedown(s3_root):
    """A writer prefix whose index lists a missing object (sorting first) is reported and skipped;
    the others are taken down; `headwater takedown` exits 1 and the audit names the prefix."""
    populate(s3_root)
    store = storage.object_root(s3_root)
    store.put("writers/0000/index.json", store.read("writers/w0/index.json"))  # names objects 0000/ lacks
    assert cli(["takedown", "--source", GONE, "--stream-root", s3_root, "--delete-grace-s", "0"]) == 1
    (finished,) = [n for n in objects(s3_root) if n.endswith("-finished.json")]
    record = json.loads(store.read(finished))
    assert list(record["writers_failed"]) == ["0000"] and record["samples_removed"] == 7
    again = remove_samples(s3_root, drop_gone, delete_grace_s=0)  # the other writers hold none of it
    assert again.removed == [] and list(again.failed) == ["0000"]


def test_a_shard_rewritten_twice_before_the_deletion_leaves_no_object(s3_root, monkeypatch):
    """Takedown 1 commits, then is killed in its delete grace; takedown 2 (another source) rewrites
    the replacement again before the original was deleted. The original object, which holds
    takedown 1's sample, is deleted from the replacement's `rewrites` history."""
    with writer(s3_root, "w0") as w:
        w.write_shard([sample("a", GONE), sample("b", "blog"), sample("c", KEPT)], domain="web",
                      settled=[OffsetRange(topic="raw", partition=0, start=0, end=3)])
    original = [n for n in objects(s3_root) if ".mds" in n]
    sleep = time.sleep

    def killed_in_grace(s: float) -> None:
        if s >= 30:
            raise Crash("killed during the delete grace")
        sleep(s)

    monkeypatch.setattr(time, "sleep", killed_in_grace)
    with pytest.raises(Crash):
        remove_samples(s3_root, drop_gone, delete_grace_s=30)
    monkeypatch.undo()
    assert set(original) <= set(objects(s3_root))
    second = remove_samples(s3_root, lambda s: s["source"] == "blog", delete_grace_s=0)
    assert len(second.replaced) == 1 and set(original) <= set(second.deleted)
    left = [n for n in objects(s3_root) if ".mds" in n]
    assert len(left) == 1 and not set(left) & set(original)
    assert not [n for n in objects(s3_root) if ".mds" in n and GONE.encode() in shard_bytes(s3_root, n)]
    assert [s["id"] for s in TailReader(s3_root).samples(timeout_s=0)] == ["c"]
    assert remove_samples(s3_root, drop_gone, delete_grace_s=0).deleted == []  # nothing left to re-run


def test_a_root_with_shards_outside_writer_prefixes_is_refused(s3_root, capsys):
    """A merged-index entry outside writers/ (e.g. a copied local root) is not rewritten by a
    takedown: it refuses the root, naming the entry, before rewriting anything (exit 1)."""
    with writer(s3_root, "w0") as w:
        publish(w, 0, "gk")
    store = storage.object_root(s3_root)
    merged, version = store.root_index()
    entry = json.loads(json.dumps(merged["shards"][0]))
    for k in ("raw_data", "zip_data"):
        entry[k]["basename"] = "legacy/" + entry[k]["basename"].rsplit("/", 1)[-1]
    store.put(entry["zip_data"]["basename"], store.read(merged["shards"][0]["zip_data"]["basename"]))
    store.put("index.json", storage.json_bytes({**merged, "shards": [*merged["shards"], entry]}), if_version=version)
    before = objects(s3_root)
    assert cli(["takedown", "--source", GONE, "--stream-root", s3_root, "--delete-grace-s", "0"]) == 1
    assert entry["zip_data"]["basename"] in capsys.readouterr().err
    (finished,) = [n for n in objects(s3_root) if n.endswith("-finished.json")]
    assert json.loads(store.read(finished))["error"].startswith("ForeignEntries")
    assert [n for n in objects(s3_root) if ".mds" in n] == [n for n in before if ".mds" in n]  # untouched
    assert GONE in denylist(s3_root)  # ingest of the source stops all the same


def test_settled_ranges_never_shrink_during_a_takedown(s3_root, monkeypatch):
    """A whole takedown (commit, merge, sidecar clean-up) lands between a reader's read of a
    writer's index and of its sidecar: the replaced shard's ranges are still found."""
    with writer(s3_root, "w0") as w:
        publish(w, 0, "gkk")
        publish(w, 1, "kkk")
    before = settled_ranges(s3_root)
    read_index_of, armed = storage.ObjectRoot.writer_index, [True]

    def index_then_takedown(self, writer_id):
        out = read_index_of(self, writer_id)
        if armed:
            armed.clear()
            assert remove_samples(s3_root, drop_gone, delete_grace_s=0).replaced
        return out

    monkeypatch.setattr(storage.ObjectRoot, "writer_index", index_then_takedown)
    during = settled_ranges(s3_root)
    monkeypatch.undo()
    assert not armed and during == before == settled_ranges(s3_root)
