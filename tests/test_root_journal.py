"""The publish journal of a local stream root (streams/manifest.py): a publish appends one line,
folds rewrite index.json by a stateless policy, torn lines from a crash are ignored and cut off,
readers see every publish exactly once across folds, and a killed writer's journal is folded by
the next one so a stock StreamingDataset of the root sees everything."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_mds_stream import HELPER, MANIFEST, rng, workload

from streams import manifest as mf
from streams.mds import LiveStreamWriter, OverlapError, TailReader, read_index, settled_ranges
from streams.mds_reader import IndexWatcher


def writer(root, writer_id="w0", **kw) -> LiveStreamWriter:
    return LiveStreamWriter(root, writer_id=writer_id, manifest=MANIFEST, **kw)


def publish(w: LiveStreamWriter, k: int, per: int = 2, topic: str = "raw.j") -> str:
    return w.write_shard(workload.make_samples(w.writer_id, k, per), domain="web",
                         settled=[rng(k * 10, k * 10 + 10, topic=topic)]).shard


def index_file_shards(root) -> int:
    """Shards a stock reader sees: the ones in the index.json file itself."""
    with open(os.path.join(root, mf.INDEX)) as f:
        return len(json.load(f)["shards"])


def journal_lines(root) -> int:
    jdir = os.path.join(root, mf.JOURNAL_DIR)
    total = 0
    for name in os.listdir(jdir):
        with open(os.path.join(jdir, name), "rb") as f:
            total += f.read().count(b"\n")
    return total


def test_a_publish_appends_one_journal_line_and_folds_follow_the_policy(tmp_path):
    with writer(tmp_path, fold_interval_s=3600) as w:
        publish(w, 0)
        assert index_file_shards(tmp_path) == 1  # the first shard makes index.json at once
        for k in range(1, 8):
            publish(w, k)
            assert len(read_index(str(tmp_path))["shards"]) == k + 1  # every reader sees it at once
        assert index_file_shards(tmp_path) == 1 and journal_lines(tmp_path) == 7
        publish(w, 8)  # FOLD_MIN (8) lines: a fold; index.json holds all, the journal is empty again
        assert index_file_shards(tmp_path) == 9 and journal_lines(tmp_path) == 0
        for k in range(9, 15):
            publish(w, k)
        assert index_file_shards(tmp_path) == 9 and journal_lines(tmp_path) == 6
        assert len(read_index(str(tmp_path))["shards"]) == 15
        # a replay of a journaled (unfolded) shard is recognised, an overlap is refused
        assert publish(w, 12) == mf.shard_name_of(read_index(str(tmp_path))["shards"][12])
        with pytest.raises(OverlapError):
            w.write_shard(workload.make_samples("w0", 99, 1), domain="web", settled=[rng(125, 135, topic="raw.j")])
        assert len(read_index(str(tmp_path))["shards"]) == 15
    assert index_file_shards(tmp_path) == 15 and journal_lines(tmp_path) == 0  # folded on close
    assert settled_ranges(str(tmp_path)) == [rng(0, 150, topic="raw.j")]


def test_the_time_policy_folds_an_old_index_and_a_bounded_job_end_folds_everything(tmp_path):
    with writer(tmp_path, fold_interval_s=0.0) as w:
        for k in range(3):
            publish(w, k)
            assert index_file_shards(tmp_path) == k + 1  # interval 0: every publish folds
    with writer(tmp_path, fold_interval_s=3600) as w:
        publish(w, 3)
        assert index_file_shards(tmp_path) == 3
        assert not mf.fold_root(str(tmp_path))  # not due
        assert mf.fold_root(str(tmp_path), force=True)
        assert index_file_shards(tmp_path) == 4 and journal_lines(tmp_path) == 0
        publish(w, 4)  # the writer's view follows the fold made by someone else
    assert index_file_shards(tmp_path) == 5


def test_a_torn_journal_line_is_ignored_by_readers_and_cut_off_by_the_next_publish(tmp_path):
    with writer(tmp_path, fold_interval_s=3600) as w:
        for k in range(2):  # 1 folded + 1 journaled
            publish(w, k)
        view = mf.RootView(str(tmp_path))
        view.refresh()
        path = mf.journal_path(str(tmp_path), view.generation)
        good = os.path.getsize(path)
        with open(path, "ab") as f:  # what a crash mid-append leaves
            f.write(b'{"kind": "shard", "name": "web.w0.torn", "info": {"raw_da')
        assert len(read_index(str(tmp_path))["shards"]) == 2
        publish(w, 2)
        assert os.path.getsize(path) > good
        with open(path, "rb") as f:
            data = f.read()
        assert data.endswith(b"\n") and b"torn" not in data
        assert len(read_index(str(tmp_path))["shards"]) == 3
    assert len(list(TailReader(tmp_path).samples(timeout_s=0))) == 6


def test_a_corrupt_complete_journal_line_is_a_clear_error(tmp_path):
    with writer(tmp_path, fold_interval_s=3600) as w:
        for k in range(2):
            publish(w, k)
    view = mf.RootView(str(tmp_path))
    view.refresh()
    with open(mf.journal_path(str(tmp_path), view.generation), "ab") as f:
        f.write(b"not json\n")
    with pytest.raises(ValueError, match="corrupt line"):
        read_index(str(tmp_path))
    assert IndexWatcher(tmp_path).poll() == []  # a watcher logs it and retries at its next poll


def test_a_legacy_root_without_a_journal_key_is_continued(tmp_path):
    with writer(tmp_path) as w:
        publish(w, 0)
    with open(os.path.join(tmp_path, mf.INDEX)) as f:
        index = json.load(f)
    index.pop(mf.JOURNAL_KEY)
    mf.atomic_write_json(os.path.join(tmp_path, mf.INDEX), index)
    shutil.rmtree(os.path.join(tmp_path, mf.JOURNAL_DIR))
    with writer(tmp_path, fold_interval_s=3600) as w:
        assert publish(w, 0) == mf.shard_name_of(index["shards"][0])  # replay recognised
        publish(w, 1)
        assert len(read_index(str(tmp_path))["shards"]) == 2
    assert index_file_shards(tmp_path) == 2


def test_readers_see_every_publish_once_while_two_writers_fold_constantly(tmp_path):
    """Two writer threads publish with fold_interval_s=0 (a fold after every publish) while an
    IndexWatcher polls: each shard appears exactly once, in the order the final index lists."""
    stop = threading.Event()
    seen: list[tuple[str, int]] = []
    watcher = IndexWatcher(tmp_path)

    def poll() -> None:
        while not stop.is_set():
            seen.extend((e.name, e.ordinal) for e in watcher.poll())

    def write(writer_id: str) -> None:
        with writer(tmp_path, writer_id, fold_interval_s=0.0) as w:
            for k in range(25):
                publish(w, k, per=1, topic=f"raw.{writer_id}")

    t = threading.Thread(target=poll)
    t.start()
    writers = [threading.Thread(target=write, args=(f"w{i}",)) for i in range(2)]
    for x in writers:
        x.start()
    for x in writers:
        x.join()
    stop.set()
    t.join()
    seen.extend((e.name, e.ordinal) for e in watcher.poll())
    final = [mf.shard_name_of(i) for i in read_index(str(tmp_path))["shards"]]
    assert len(final) == 50 and sorted(n for n, _ in seen) == sorted(final)
    assert all(final[o] == n for n, o in seen)


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_kill_9_mid_publish_then_restart_loses_and_duplicates_nothing(tmp_path, trial):
    """A writer process publishing (one shard per 10 offsets, fold_interval_s=0 so folds happen
    too) is killed with SIGKILL at a random moment; a restarted writer resumes from settled() and
    finishes. Every offset is settled once, every published sample is read exactly once by the
    TailReader and by a stock StreamingDataset of the root."""
    from streaming import StreamingDataset

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(HELPER), "resume-append", str(tmp_path), "kw", "40", "2"]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not os.path.isdir(tmp_path / mf.JOURNAL_DIR) and time.monotonic() < deadline:
        time.sleep(0.005)  # the first publish
    time.sleep(random.uniform(0.0, 0.8))
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert settled_ranges(str(tmp_path)) == [rng(0, 400, topic="raw.kw")]
    ids = [s["id"] for s in TailReader(tmp_path).samples(timeout_s=0)]
    assert len(ids) == len(set(ids)) == 80
    ds = StreamingDataset(local=str(tmp_path), shuffle=False, batch_size=1)
    assert sorted(s["id"] for s in ds) == sorted(ids)


def test_headwater_fold_makes_a_copy_of_a_live_root_complete_for_a_stock_reader(tmp_path, capsys):
    from streaming import StreamingDataset

    from infra.cli import main as cli

    root = tmp_path / "root"
    with writer(root, fold_interval_s=3600) as w:
        for k in range(4):
            publish(w, k)
        assert index_file_shards(root) == 1  # live: 3 shards only in the journal
        assert cli(["fold", str(root)]) == 0
        assert "index.json lists 4 shards" in capsys.readouterr().out
        shutil.copytree(root, tmp_path / "copy")
        ds = StreamingDataset(local=str(tmp_path / "copy"), shuffle=False, batch_size=1)
        assert len(ds) == 8


def test_valid_lines_before_a_corrupt_one_are_applied_once_however_often_a_reader_retries(tmp_path):
    with writer(tmp_path, fold_interval_s=3600) as w:
        publish(w, 0)  # folded (the first shard makes index.json)
    view = mf.RootView(str(tmp_path))
    view.refresh()
    with open(mf.journal_path(str(tmp_path), view.generation), "ab") as f:
        with writer(tmp_path / "other", "w1") as w2:  # a real record of a second shard, then garbage
            publish(w2, 1)
        other = mf.RootView(str(tmp_path / "other"))
        other.refresh()
        name = mf.shard_name_of(other.infos[0])
        os.link(tmp_path / "other" / other.infos[0]["zip_data"]["basename"],
                tmp_path / other.infos[0]["zip_data"]["basename"])
        f.write(json.dumps({"kind": "shard", "name": name, "info": other.infos[0],
                            "entry": other.side["shards"][name]}).encode() + b"\n")
        f.write(b'{"kind": "shard_v9", "name": "x", "entry": {}}\n' + b"[" * 100_000 + b"\n")
    for _ in range(3):
        with pytest.raises(ValueError, match="corrupt line"):
            view.refresh()
    assert [mf.shard_name_of(i) for i in view.infos].count(name) == 1 and len(view.infos) == 2


def test_settled_only_windows_count_toward_the_fold_threshold(tmp_path):
    """A mostly filtered stream (settled-only windows, one shard): folds stay geometric in the
    number of folded entries (~40 for 1,000 windows), not one per 8 windows (125)."""
    generations = set()
    with writer(tmp_path, fold_interval_s=3600, durable=False) as w:
        publish(w, 0)
        for k in range(1, 1001):
            w.write_shard([], domain="web", settled=[rng(k * 10, k * 10 + 10, topic="raw.j")])
            generations.add(w._view.generation)
    assert len(generations) <= 45, len(generations)


def test_the_overlap_check_stays_exact_on_a_legacy_root_whose_spans_overlap(tmp_path):
    with writer(tmp_path) as w:
        publish(w, 0)
    view = mf.RootView(str(tmp_path))
    view.refresh()
    side = view.side
    side["settled_only"]["legacy-a"] = {**next(iter(side["shards"].values())), "settled": [
        {"topic": "raw.x", "partition": 0, "start": 0, "end": 100}]}
    side["settled_only"]["legacy-b"] = {**side["settled_only"]["legacy-a"], "settled": [
        {"topic": "raw.x", "partition": 0, "start": 10, "end": 20}]}
    with mf.root_lock(str(tmp_path)):
        mf.write_root(str(tmp_path), {"shards": view.infos}, side)
    with writer(tmp_path) as w, pytest.raises(OverlapError, match="legacy-a"):
        w.write_shard(workload.make_samples("w0", 5, 1), domain="web", settled=[rng(50, 60, topic="raw.x")])
