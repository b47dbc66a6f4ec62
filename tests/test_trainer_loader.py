"""The live loader under production conditions: two roots, a quiet root, a domain at the weight floor,
a rank split under quarantine, newest-first reading with a bounded backlog, cursor-only checkpoints,
and (torchrun, 2 ranks) an empty stream at start."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest

from trainer import cpu_compat

cpu_compat.install()

from trainer.data.buffers import StreamBuffers
from trainer.data.loader import LiveStreamDataLoader
from trainer.mixing import Mixer
from trainer.runs import read_metrics, train_argv
from trainer.synthetic import write_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = {"dp_world_size": 1, "dp_rank": 0, "seq_len": 32, "local_batch_size": 2, "vocab_size": 64}


def loader(roots: list[str], **cfg) -> LiveStreamDataLoader:
    return LiveStreamDataLoader(LiveStreamDataLoader.Config(stream_roots=roots, **cfg), **KW)


def batches(ld: LiveStreamDataLoader, n: int) -> list[dict]:
    it = iter(ld)
    return [next(it)[0] for _ in range(n)]


def test_two_roots_both_feed_the_loader_and_resume_from_cursors(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_stream(a, domains={"markov": "markov"}, shards=2, per_shard=20, vocab=64)
    write_stream(b, domains={"counting": "counting"}, shards=2, per_shard=20, vocab=64, seed=1)
    cfg = {"mixing": Mixer.Config(policy="static")}
    first = loader([a, b], **cfg)
    seen = {d for x in batches(first, 6) for d in x["_meta"].doc_domains}
    state = first.state_dict()
    expected = [x["input"] for x in batches(first, 4)]
    first.close()
    assert seen == {"markov", "counting"}
    assert len(pickle.dumps(state)) < 4096, "a checkpoint must hold cursors, not samples"
    again = loader([a, b], **cfg)
    again.load_state_dict(state)
    got = [x["input"] for x in batches(again, 4)]
    again.close()
    assert all((x == y).all() for x, y in zip(expected, got))


def test_a_quiet_root_does_not_slow_a_busy_one(tmp_path):
    busy, quiet = str(tmp_path / "busy"), str(tmp_path / "quiet")
    write_stream(busy, domains={"markov": "markov"}, shards=4, per_shard=60, vocab=64)
    os.makedirs(quiet)  # no index yet: a root that publishes nothing for now

    def timed(roots: list[str]) -> float:
        ld = loader(roots, mixing=Mixer.Config(policy="static"))
        it = iter(ld)
        next(it)  # start-up (threads, first shard) outside the measurement
        t0 = time.perf_counter()
        for _ in range(60):
            next(it)
        dt = time.perf_counter() - t0
        ld.close()
        return dt

    alone, beside = min(timed([busy]) for _ in range(2)), min(timed([busy, quiet]) for _ in range(2))
    # the old single prefetch loop blocked 50 ms per round on the quiet root: 60 batches took seconds
    assert beside < 1.25 * alone + 0.05, f"busy alone {alone:.3f}s, beside a quiet root {beside:.3f}s"

    ld = loader([busy, quiet], mixing=Mixer.Config(policy="static"), poll_interval_s=0.05)
    it = iter(ld)
    next(it)
    write_stream(quiet, domains={"counting": "counting"}, shards=1, per_shard=40, vocab=64, seed=2)
    deadline = time.monotonic() + 20
    while "counting" not in ld.mixer.domains and time.monotonic() < deadline:
        ld.mixer.add_domains(ld.buffers.domains())  # as the trainer's observe() would
        next(it)
    assert any("counting" in next(it)[0]["_meta"].doc_domains for _ in range(20)), "quiet root never read"
    ld.close()


def test_loader_memory_is_bounded_with_a_domain_at_the_weight_floor(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains={"junk": "noise", "good": "markov"}, shards=6, per_shard=100, vocab=64)
    cap = 32 << 10
    ld = loader([root], domain_buffer_bytes=cap, backlog_shards=0, read_ahead_s=0.0, read_ahead_batches=50,
                mixing=Mixer.Config(policy="static", weights={"good": 1.0, "junk": 0.0}, floor=0.02, smoothing=0.0))
    ld.mixer.observe({}, {}, {}, {})  # the static weights take effect: junk at the floor
    assert ld.mixer.weight_dict()["junk"] == pytest.approx(0.02)
    it = iter(ld)
    for _ in range(40):
        next(it)
    time.sleep(0.5)  # give the readers every chance to overfill
    feeds = ld.buffers.feeds
    biggest_doc = 160 * 4 + 256
    assert feeds["junk"].bytes <= cap + biggest_doc and feeds["good"].bytes <= cap + biggest_doc
    assert feeds["junk"].cap_bytes < feeds["good"].cap_bytes / 5  # read-ahead follows the draw weight
    assert ld.buffers.available["junk"] < 200, "the floor domain kept reading although its buffer was full"
    assert ld.trained.get("junk", 0) < ld.trained["good"]
    assert len(pickle.dumps(ld.state_dict())) < 4096
    ld.close()


@pytest.mark.timeout(120)
def test_a_domain_new_since_start_up_is_drawn_when_the_known_ones_run_dry(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains={"old": "markov"}, shards=1, per_shard=4, vocab=64)
    write_stream(root, domains={"new": "counting"}, shards=2, per_shard=40, vocab=64, writer_id="w2", seed=1)
    ld = loader([root], domains=["old"], starve_timeout_s=1)  # the mixer knows only "old" at start
    it, seen = iter(ld), set()
    for _ in range(40):  # "old" (4 documents of ~150 tokens) runs dry within ~10 batches of 64 tokens
        seen |= set(next(it)[0]["_meta"].doc_domains)
        if "new" in seen:
            break
    ld.close()
    assert seen == {"old", "new"} and "new" in ld.mixer.domains


def drain(buf: StreamBuffers, domains: list[str], quarantine_after: int | None, shards: set[str]) -> list[str]:
    if quarantine_after == 0:
        buf.drop_shards(shards)
    buf.start()
    ids: list[str] = []
    for d in domains:
        while (doc := buf.take(d, 1.0)) is not None:
            ids.append(doc.id)
            if quarantine_after is not None and len(ids) >= quarantine_after:
                buf.drop_shards(shards)
                quarantine_after = None
    buf.close()
    return ids


def test_rank_split_stays_consistent_under_quarantine(tmp_path):
    root = str(tmp_path / "s")
    names = write_stream(root, domains={"a": "markov", "b": "counting"}, shards=4, per_shard=15, vocab=64)
    bad = {names[2], names[5]}  # one shard of each domain
    # rank 0 quarantines before reading; rank 1 after reading some samples (the quarantine reaches
    # ranks at different points of their reading); in the old split by sample ordinal this
    # duplicated or lost samples
    r0 = drain(StreamBuffers([root], dp_rank=0, dp_world=2), ["a", "b"], 0, bad)
    r1 = drain(StreamBuffers([root], dp_rank=1, dp_world=2), ["a", "b"], 10, bad)
    assert not set(r0) & set(r1) and len(r0) == len(set(r0)) and len(r1) == len(set(r1))
    bad_ids = {f"{d}-{s}-{i}" for d, s in (("a", 1), ("b", 2)) for i in range(15)}  # shards 2 and 5
    everything = {f"{d}-{s}-{i}" for d in "ab" for s in range(4) for i in range(15)}
    assert (everything - bad_ids) <= set(r0) | set(r1) <= everything
    assert not bad_ids & set(r0)  # quarantined before reading: nothing of it
    # each rank reads only its own shards: half of each domain's shards
    assert {i.rsplit("-", 1)[0] for i in r0} | {i.rsplit("-", 1)[0] for i in r1} >= {"a-0", "a-3", "b-0", "b-3"}
    assert not {i.rsplit("-", 1)[0] for i in r0} & {i.rsplit("-", 1)[0] for i in r1}


def test_newest_shard_first_and_a_bounded_backlog(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains={"m": "markov"}, shards=8, per_shard=10, vocab=64)
    buf = StreamBuffers([root], dp_rank=0, dp_world=1, backlog_shards=3)
    ids = drain(buf, ["m"], None, set())
    shards_in_order = list(dict.fromkeys(i.rsplit("-", 1)[0] for i in ids))
    assert shards_in_order == ["m-7", "m-6", "m-5"]  # newest first; 5 older shards beyond the backlog skipped
    assert buf.skipped() == {"m": {"shards": 5, "samples": 50}}


def test_shards_lagging_the_newest_by_more_than_max_lag_are_skipped(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from streams import mds_writer

    clock = [1000.0]
    monkeypatch.setattr(mds_writer, "time", SimpleNamespace(time=lambda: clock[0],  # publish times
                                                            monotonic=time.monotonic))
    root = str(tmp_path / "s")
    for s in range(5):  # published at 1000, 1100, ..., 1400
        write_stream(root, domains={"m": "markov"}, shards=1, per_shard=10, vocab=64, start_shard=s)
        clock[0] += 100
    buf = StreamBuffers([root], dp_rank=0, dp_world=1, max_lag_s=150)
    ids = drain(buf, ["m"], None, set())
    assert list(dict.fromkeys(i.rsplit("-", 1)[0] for i in ids)) == ["m-4", "m-3"]  # 1400, 1300; not <= 1250
    assert buf.skipped() == {"m": {"shards": 3, "samples": 30}}

    # the unread rest of the shard being read is left once a shard max_lag_s newer is published
    live = str(tmp_path / "live")
    write_stream(live, domains={"m": "markov"}, shards=1, per_shard=40, vocab=64)
    buf = StreamBuffers([live], dp_rank=0, dp_world=1, max_lag_s=150, domain_buffer_bytes=2048)
    buf.start()
    first = [buf.take("m", 5.0).id for _ in range(3)]
    clock[0] += 1000
    write_stream(live, domains={"m": "markov"}, shards=1, per_shard=10, vocab=64, start_shard=1)
    buf.notify()
    time.sleep(0.5)  # the poll thread has seen the new shard
    rest = []
    while (doc := buf.take("m", 2.0)) is not None:
        rest.append(doc.id)
    buf.close()
    read = first + rest
    assert [i for i in read if i.startswith("m-1-")] == [f"m-1-{i}" for i in range(10)]
    old = [i for i in read if i.startswith("m-0-")]
    assert old == [f"m-0-{i}" for i in range(len(old))] and len(old) < 40  # read in order, rest skipped
    assert buf.skipped()["m"]["samples"] == 40 - len(old)


APPEND_LATER = (  # one shard per domain after 5 s (all rank 0's), the next ones 45 s later (rank 1's)
    "import sys, time; from trainer.synthetic import write_stream; "
    "kw = dict(domains={'markov': 'markov', 'counting': 'counting'}, shards=1, per_shard=40, vocab=512, seed=5); "
    "time.sleep(5); write_stream(sys.argv[1], **kw); time.sleep(45); write_stream(sys.argv[1], start_shard=1, **kw)"
)


@pytest.mark.slow
def test_empty_stream_at_start_all_ranks_wait_then_train(tmp_path):
    stream, run = str(tmp_path / "stream"), str(tmp_path / "run")
    os.makedirs(stream)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    # rank 0 has data 45 s before rank 1 (~30 s after start-up): longer than the process groups' timeouts (15 s), which
    # abort a run whose rank 0 trains while rank 1 waits for data alone
    appender = subprocess.Popen([sys.executable, "-c", APPEND_LATER, stream], env=env, cwd=ROOT)
    try:
        cmd = train_argv([stream], run, "--nproc", "2", "--vocab-size", "512", "--no-wandb", "--steps", "3",
                         "--checkpoint-every", "100", "--dataloader.heartbeat_s", "1",
                         "--comm.init_timeout_seconds", "15", "--comm.train_timeout_seconds", "15")
        proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    finally:
        appender.wait(timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert set(steps[-1]["weights"]) == {"markov", "counting"}
    assert steps[0]["data_wait_s"] > 15  # step 1 waited longer than the timeouts for rank 1's data, all ranks together


def _mixed_root(root: str, shards: int, per: int) -> list[str]:
    """Shards of domain "m" mixing sources keep / gone / gone2 (the last shard is all "gone");
    the sample ids ("<shard>-<i>-<source>")."""
    import numpy as np

    from streams.mds import LiveStreamWriter

    def source(s: int, i: int) -> str:
        return "gone" if s == shards - 1 or i % 3 == 1 else "gone2" if i % 5 == 2 else "keep"

    with LiveStreamWriter(root, writer_id="w", manifest={"vocab_version": "v"}) as w:
        for s in range(shards):
            w.write_shard([{"id": f"{s}-{i}-{source(s, i)}", "modality": "text", "source": source(s, i),
                            "license": "cc0", "tokens": np.arange(8 + i, dtype=np.int32) % 64}
                           for i in range(per)], domain="m")
    return [f"{s}-{i}-{source(s, i)}" for s in range(shards) for i in range(per)]


@pytest.mark.parametrize(("consumed", "takedowns"), [(0, 1), (7, 1), (13, 1), (7, 2), (13, 2)])
def test_a_takedown_mid_read_is_followed_by_every_rank_without_loss_or_repeat(tmp_path, consumed, takedowns):
    """Two ranks read a domain whose shards mix sources; each has consumed ``consumed`` documents
    when one or two takedowns in a row rewrite the shards (the last shard is emptied: every sample
    is of "gone"). The feeds follow the replacements (same rank, cursor carried over): across both
    ranks every "keep" document is trained exactly once and nothing taken down after the takedowns."""
    from streams.mds_rewrite import remove_samples

    root = str(tmp_path / "s")
    ids = _mixed_root(root, 6, 10)
    corrupt: list[str] = []
    ranks = [StreamBuffers([root], dp_rank=r, dp_world=2, domain_buffer_bytes=4096,
                           on_corrupt=lambda *a: corrupt.append(a[1])) for r in range(2)]
    before: list[list[str]] = [[], []]
    for r, buf in enumerate(ranks):
        buf.start()
        while len(before[r]) < consumed and (doc := buf.take("m", 1.0)) is not None:
            before[r].append(doc.id)
        buf.stop()  # (a takedown arrives between two polls; stopping makes the order deterministic)
    gone = ["gone", "gone2"][:takedowns]
    for source in gone:
        remove_samples(root, lambda s, source=source: s["source"] == source)
    after: list[list[str]] = [[], []]
    for r, buf in enumerate(ranks):
        buf.start()  # the first poll is synchronous: the replacements are taken over here
        while (doc := buf.take("m", 1.0)) is not None:
            after[r].append(doc.id)
        buf.close()
    keep = {i for i in ids if i.rsplit("-", 1)[1] not in gone}
    trained = before[0] + before[1] + after[0] + after[1]
    assert not [i for i in after[0] + after[1] if i.rsplit("-", 1)[1] in gone], "a removed sample was read"
    assert sorted(i for i in trained if i in keep) == sorted(keep), "a kept sample was lost or repeated"
    assert not corrupt, f"false corrupt-shard reports: {corrupt}"


@pytest.mark.parametrize("takedowns", [1, 2])
def test_a_checkpoint_cursor_taken_before_a_takedown_resumes_in_the_replacement(tmp_path, takedowns):
    """A loader checkpointed mid-shard; one or two takedowns rewrite the stream; a new loader
    restores the cursor (its shards are now replaced, twice): it continues exactly after the
    trained kept samples, and a carried document is re-read from the replacement."""
    import numpy as np

    from streams.mds import LiveStreamWriter
    from streams.mds_rewrite import remove_samples

    def source(i: int) -> str:
        return {2: "gone", 3: "gone2"}.get(i % 4, "keep")

    root = str(tmp_path / "s")
    with LiveStreamWriter(root, writer_id="w", manifest={"vocab_version": "v"}) as w:
        for s in range(3):
            w.write_shard([{"id": f"{s}-{i}", "modality": "text", "source": source(i),
                            "license": "cc0", "tokens": np.arange(8 + i, dtype=np.int32) % 64}
                           for i in range(12)], domain="m")
    first = StreamBuffers([root], dp_rank=0, dp_world=1, domain_buffer_bytes=2048)
    first.start()
    docs = [first.take("m", 1.0) for _ in range(17)]  # one shard and 5 samples of the next
    before = [d.id for d in docs]
    state = first.state_dict()
    first.close()
    gone = ["gone", "gone2"][:takedowns]
    for name in gone:
        remove_samples(root, lambda s, name=name: s["source"] == name)
    again = StreamBuffers([root], dp_rank=0, dp_world=1, domain_buffer_bytes=2048)
    again.start()  # the replacements are listed before the cursor is restored (as in the loader)
    again.load_state_dict(state)
    # a checkpoint's carried document is re-read from the replacement (a removed one has no tokens)
    kept_doc, gone_doc = docs[-1], next(d for d in docs if d.source == gone[-1])
    assert kept_doc.source == "keep"
    assert (again.fetch_tokens(0, kept_doc.shard, kept_doc.index) == kept_doc.tokens).all()
    assert again.fetch_tokens(0, gone_doc.shard, gone_doc.index).size == 0
    after = []
    while (doc := again.take("m", 1.0)) is not None:
        after.append(doc.id)
    again.close()
    keep = {f"{s}-{i}" for s in range(3) for i in range(12) if source(i) not in gone}
    assert not [i for i in after if i not in keep]
    assert sorted(i for i in before + after if i in keep) == sorted(keep)
