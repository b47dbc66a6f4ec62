"""The loader's freshness policy (issue #17): a sane read-ahead from the first batch on, stale data
(a shard published more than ``max_lag_s`` before this rank's newest) skipped when taken, buffered
or carried by the packer, counted, with exact cursors; a paused stream still trains."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from trainer import cpu_compat

cpu_compat.install()

from streams import mds_writer
from trainer.data.buffers import MIN_CAP_BYTES, TOKEN_BYTES, StreamBuffers
from trainer.data.loader import LiveStreamDataLoader
from trainer.mixing import Mixer
from trainer.synthetic import write_stream


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """Publish times of the shards written (the sidecar's ``published_at``), set by the test."""
    now = [1000.0]
    monkeypatch.setattr(mds_writer, "time", SimpleNamespace(time=lambda: now[0], monotonic=time.monotonic))
    return now


def publish(root: str, clock: list[float], at: float, shard: int, domain: str = "m", per_shard: int = 10) -> str:
    clock[0] = at
    return write_stream(root, domains={domain: "markov"}, shards=1, per_shard=per_shard, vocab=64,
                        start_shard=shard)[0]


def seen(buf: StreamBuffers, at: float) -> None:
    """Wait until the poll thread has listed a shard published at ``at``."""
    buf.notify()
    assert buf.wait_until(lambda: buf.newest_published >= at, 10.0)


def loader(root: str, **cfg) -> LiveStreamDataLoader:
    return LiveStreamDataLoader(LiveStreamDataLoader.Config(stream_roots=[root], **cfg), dp_world_size=1,
                                dp_rank=0, seq_len=16, local_batch_size=1, vocab_size=64)


def test_the_first_batch_sizes_read_ahead_from_batches_not_from_start_up(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains={"noise": "noise", "markov": "markov"}, shards=2, per_shard=20, vocab=64)
    ld = LiveStreamDataLoader(LiveStreamDataLoader.Config(stream_roots=[root]), dp_world_size=1, dp_rank=0,
                              seq_len=32, local_batch_size=2, vocab_size=64)
    it = iter(ld)
    next(it)
    caps = dict(ld.buffers._caps or {})
    ld.close()
    # each domain: read_ahead_batches batches at its weight (<= 1), rounded up by at most 1/8
    bound = MIN_CAP_BYTES + 1.125 * ld.config.read_ahead_batches * ld.batch_tokens * TOKEN_BYTES
    assert set(caps) == {"noise", "markov"} and max(caps.values()) <= bound, caps


@pytest.mark.parametrize("max_lag_s", [50.0, 0.0])
def test_buffered_documents_of_a_stale_shard_are_skipped_when_taken(tmp_path, clock, max_lag_s):
    root = str(tmp_path / "s")
    old = publish(root, clock, 1000, 0)
    buf = StreamBuffers([root], dp_rank=0, dp_world=1, max_lag_s=max_lag_s).start()  # 64 MiB: reads all
    first = [buf.take("m", 5.0).id for _ in range(3)]
    assert buf.wait_until(lambda: buf.feeds["m"].docs == 7, 10.0)
    publish(root, clock, 1100, 0, domain="n")  # another domain, 100 s newer
    seen(buf, 1100)
    rest = []
    while (doc := buf.take("m", 0.5)) is not None:
        rest.append(doc.id)
    fresh = buf.take("n", 5.0).id
    skipped, cursor = buf.skipped(), buf.state_dict()["feeds"]["m"]
    buf.close()
    assert first == ["m-0-0", "m-0-1", "m-0-2"] and fresh == "n-0-0"
    if max_lag_s:
        assert rest == [] and skipped == {"m": {"shards": 1, "samples": 7}}
    else:  # no bound: everything is trained, as before the policy
        assert rest == [f"m-0-{i}" for i in range(3, 10)] and skipped == {}
    assert cursor["done"] == [(0, old)] and cursor["current"] is None  # passed exactly, either way


def test_a_paused_stream_and_a_rank_behind_the_others_still_train(tmp_path, clock):
    root = str(tmp_path / "s")  # shards decades older than the wall clock
    publish(root, clock, 1000, 0)
    publish(root, clock, 1100, 1)  # the domain's next shard is rank 1's: rank 0's newest stays at 1000
    ranks = [StreamBuffers([root], dp_rank=r, dp_world=2, max_lag_s=20).start() for r in (0, 1)]
    got = []
    for buf in ranks:
        ids = []
        while (doc := buf.take("m", 1.0)) is not None:
            ids.append(doc.id)
        got.append((ids, buf.skipped()))
        buf.close()
    assert got == [([f"m-0-{i}" for i in range(10)], {}), ([f"m-1-{i}" for i in range(10)], {})]

    paused = str(tmp_path / "paused")
    publish(paused, clock, 1000, 0)
    ld = loader(paused, max_lag_s=20)
    it = iter(ld)
    ids = [i for _ in range(6) for i in next(it)[0]["_meta"].doc_ids]
    ld.close()
    assert ids[0] == "m-0-0" and ld.buffers.skipped() == {}


def test_the_rest_of_a_split_document_from_a_stale_shard_is_dropped_and_resume_stays_exact(tmp_path, clock):
    root = str(tmp_path / "s")
    publish(root, clock, 1000, 0)
    cfg = {"max_lag_s": 50.0, "mixing": Mixer.Config(policy="static")}
    a = loader(root, **cfg)
    it = iter(a)
    next(it)  # 17 tokens of the first document (24 or more): the packer carries its rest
    assert a.packer.carry is not None and a.packer.carry.id == "m-0-0"
    state = a.state_dict()
    publish(root, clock, 1100, 1)
    seen(a.buffers, 1100)
    after = [next(it) for _ in range(3)]
    a.close()
    ids = [i for batch, _ in after for i in batch["_meta"].doc_ids]
    assert ids[0] == "m-1-0" and all(i.startswith("m-1-") for i in ids)  # no rest of m-0-0, nothing of m-0
    assert a.buffers.skipped() == {"m": {"shards": 1, "samples": 10}}  # m-0-0's rest and m-0-1..9

    b = loader(root, **cfg)  # a resume (or rollback) from the checkpoint that holds the stale carry
    b.load_state_dict(state)
    assert b.packer.carry is not None and b.packer.carry.id == "m-0-0"
    it = iter(b)
    again = [next(it) for _ in range(3)]
    b.close()
    assert all(torch.equal(x["input"], y["input"]) for (x, _), (y, _) in zip(after, again, strict=True))
    assert b.buffers.skipped() == {"m": {"shards": 1, "samples": 10}}
