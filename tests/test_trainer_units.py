"""Fast unit tests of the trainer parts: packing, CPU attention mask, loader draws, data sharding (policies: test_mixing_policies)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from trainer import cpu_compat

cpu_compat.install()

from trainer.data.buffers import StreamBuffers
from trainer.data.loader import LiveStreamDataLoader
from trainer.data.packer import IGNORE_INDEX, Doc, Packer
from trainer.mixing import Mixer
from trainer.models import build_model
from trainer.synthetic import write_stream

DOMAINS = {"noise": "noise", "markov": "markov", "counting": "counting"}


def docs(*lengths):
    it = iter([Doc(f"d{i}", "a" if i % 2 == 0 else "b", np.arange(100 * i, 100 * i + n, dtype=np.int32))
               for i, n in enumerate(lengths)])
    return lambda: next(it)


def test_packer_masks_document_boundaries_and_carries_remainder():
    p = Packer(seq_len=8)
    row = p.pack(docs(3, 4, 10))
    assert row.positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert row.input.tolist() == [0, 1, 2, 100, 101, 102, 103, 200]
    # labels never cross a document boundary
    assert row.labels.tolist() == [1, 2, IGNORE_INDEX, 101, 102, 103, IGNORE_INDEX, 201]
    assert row.domains == ["a"] * 3 + ["b"] * 4 + ["a"]
    # the split document continues in the next row from its last placed token
    nxt = p.pack(docs())  # only the carried remainder (10 - 2 + 1 = 9 tokens)
    assert nxt.input.tolist() == list(range(201, 209)) and nxt.positions[0] == 0


def test_dense_document_mask_matches_separate_documents():
    model = build_model("debug_cpu", vocab_size=128)
    torch.manual_seed(0)
    a, b = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 7))
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        together = model(packed, positions=pos)
        alone = model(b)
    torch.testing.assert_close(together[:, 5:], alone, rtol=1e-5, atol=1e-5)


def drain(buf: StreamBuffers, expected: int) -> list[str]:
    buf.start()
    ids: list[str] = []
    while len(ids) < expected:
        got = [buf.take(d, 5.0) for d in sorted(DOMAINS)]
        ids += [g.id for g in got if g is not None]
        if all(g is None for g in got):
            break
    buf.stop()
    return ids


def test_dp_ranks_get_disjoint_samples_covering_the_stream(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains=DOMAINS, shards=2, per_shard=10, vocab=64)
    r0 = drain(StreamBuffers([root], dp_rank=0, dp_world=2), 30)
    r1 = drain(StreamBuffers([root], dp_rank=1, dp_world=2), 30)
    assert not set(r0) & set(r1)
    assert len(set(r0) | set(r1)) == 60


def test_corrupt_shard_is_skipped_and_reported(tmp_path):
    root = str(tmp_path / "s")
    names = write_stream(root, domains={"markov": "markov"}, shards=3, per_shard=10, vocab=64)
    bad = next(f for f in os.listdir(root) if f.startswith(names[1]))
    with open(os.path.join(root, bad), "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 16)
    reports = []
    loader = LiveStreamDataLoader(
        LiveStreamDataLoader.Config(stream_roots=[root], starve_timeout_s=3),
        dp_world_size=1, dp_rank=0, seq_len=64, local_batch_size=4, vocab_size=64,
        on_corrupt=lambda r, s, why: reports.append((s, why)))
    it = iter(loader)
    seen = set()
    for _ in range(6):
        batch, _labels = next(it)
        seen |= set(batch["_meta"].shards)
    loader.close()
    assert reports and reports[0][0] == names[1]
    assert names[1] not in seen and {names[0], names[2]} <= seen


def test_loader_resume_yields_identical_batches(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains=DOMAINS, shards=2, per_shard=20, vocab=64)
    cfg = LiveStreamDataLoader.Config(stream_roots=[root], mixing=Mixer.Config(policy="static"))
    kw = {"dp_world_size": 1, "dp_rank": 0, "seq_len": 32, "local_batch_size": 2, "vocab_size": 64}
    a = LiveStreamDataLoader(cfg, **kw)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    expected = [next(it)[0]["input"] for _ in range(4)]
    a.close()
    b = LiveStreamDataLoader(cfg, **kw)
    b.load_state_dict(state)
    it = iter(b)
    got = [next(it)[0]["input"] for _ in range(4)]
    b.close()
    for x, y in zip(expected, got):
        assert torch.equal(x, y)


def test_loss_guard_flags_nan_and_spikes_then_asks_for_rollback():
    from trainer.guard import LossGuard

    guard = LossGuard.Config(window=20, z_threshold=4.0, min_history=5, max_spikes=2).build()
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert guard.check(3.0 + 0.01 * rng.standard_normal()) is None
    assert "non-finite" in guard.check(float("nan"))
    assert not guard.should_roll_back()
    assert "spike" in guard.check(9.0)
    assert guard.should_roll_back()
    assert guard.check(3.0) is None  # flagged losses never enter the window
    restored = LossGuard.Config(window=20, z_threshold=4.0, min_history=5, max_spikes=2).build()
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_quarantine_skips_shards_and_sources_including_buffered_samples(tmp_path):
    root = str(tmp_path / "s")
    leaky = write_stream(root, domains={"markov": "markov"}, shards=2, per_shard=20, vocab=64, writer_id="w2",
                         seed=1, source="site:leaky")
    good = write_stream(root, domains={"markov": "markov"}, shards=3, per_shard=20, vocab=64, source="site:good")
    cfg = LiveStreamDataLoader.Config(stream_roots=[root], starve_timeout_s=2, read_ahead_batches=1000)
    loader = LiveStreamDataLoader(cfg, dp_world_size=1, dp_rank=0, seq_len=32, local_batch_size=2, vocab_size=64)
    it = iter(loader)
    first = next(it)[0]["_meta"]
    deadline = time.monotonic() + 10
    while loader.buffers.available.get("markov", 0) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)  # everything read into the buffers: the quarantine must purge them
    assert "site:leaky" not in first.doc_sources
    dropped = loader.quarantine(shards={good[1]}, sources={"site:leaky"})
    assert dropped >= 40
    assert loader.pending_shards() <= {good[0], good[2]}
    seen_sources, seen_shards = set(), set()
    for _ in range(8):  # ~35 good documents left: plenty for 8 batches of 2 x 33 tokens
        meta = next(it)[0]["_meta"]
        seen_sources |= set(meta.doc_sources)
        seen_shards |= set(meta.shards)
    loader.close()
    assert seen_sources == {"site:good"} and not seen_shards & ({good[1]} | set(leaky))


def test_a_domain_fed_only_by_quarantined_sources_is_never_drawn_or_waited_for(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains={"clean": "markov"}, shards=2, per_shard=40, vocab=64, source="site:good")
    write_stream(root, domains={"leak": "markov"}, shards=1, per_shard=20, vocab=64, writer_id="w2", seed=1,
                 source="site:leaky")
    loader = LiveStreamDataLoader(LiveStreamDataLoader.Config(stream_roots=[root], starve_timeout_s=30),
                                  dp_world_size=1, dp_rank=0, seq_len=32, local_batch_size=2, vocab_size=64)
    it = iter(loader)
    next(it)
    deadline = time.monotonic() + 10
    while "leak" not in loader.buffers.domain_sources and time.monotonic() < deadline:
        time.sleep(0.05)
    loader.quarantine(sources={"site:leaky"})
    assert loader.buffers.retired_domains() == {"leak"}
    started = time.monotonic()
    for _ in range(5):
        meta = next(it)[0]["_meta"]
        assert set(meta.doc_sources) == {"site:good"}
    loader.close()
    assert time.monotonic() - started < 20, "the quarantined domain was waited for"


def test_batch_packing_matches_row_by_row_packing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=300)  # empty documents, short ones and ones split over rows
    made = [Doc(f"d{i}", "ab"[i % 2], rng.integers(0, 99, size=n).astype(np.int32)) for i, n in enumerate(lengths)]
    one, many = Packer(seq_len=16), Packer(seq_len=16)
    a, b = iter(made), iter(made)
    for _ in range(10):
        rows = [one.pack(lambda: next(a)) for _ in range(3)]
        batch = many.pack_batch(lambda: next(b), 3)
        for k in ("input", "labels", "positions"):
            assert np.array_equal(getattr(batch, k), np.stack([getattr(r, k) for r in rows])), k
            assert getattr(batch, k).flags.c_contiguous and getattr(batch, k).dtype == np.int64
        assert [[batch.docs[i].id for i in row] for row in batch.doc_index] == \
            [[r.docs[i].id for i in r.doc_index] for r in rows]
        assert [d.id for d in batch.docs] == [d.id for r in rows for d in r.docs]


def test_domain_sums_reduce_losses_and_tokens_per_domain_without_ignored_positions():
    from trainer.data.loader import BatchMeta

    idx = torch.tensor([[0, 0, 1, 1, 2], [2, 2, 0, 1, 1]])
    labels = torch.tensor([[5, IGNORE_INDEX, 7, 8, 9], [1, 2, IGNORE_INDEX, 3, IGNORE_INDEX]])
    losses = torch.tensor([[1.0, float("nan"), 2.0, 3.0, 4.0], [5.0, 6.0, 1e9, 7.0, 8.0]])
    meta = BatchMeta(domains=["a", "b", "c"], domain_idx=idx, doc_ids=[], doc_domains=[], doc_sources=[],
                     shards=[], produced_at=[], wait_s=0.0, starved=[])
    loss_sum, tokens = meta.domain_sums(losses, labels)
    assert loss_sum == {"a": 1.0, "b": 12.0, "c": 15.0}
    assert tokens == {"a": 1, "b": 3, "c": 3}


def mixed_loader(root: str, **cfg) -> LiveStreamDataLoader:
    return LiveStreamDataLoader(LiveStreamDataLoader.Config(stream_roots=[root], **cfg), dp_world_size=1,
                                dp_rank=0, seq_len=512, local_batch_size=2, vocab_size=64)


def test_documents_follow_mixing_weights_and_skip_paused_domains(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains=DOMAINS, shards=2, per_shard=80, vocab=64)
    loader = mixed_loader(root, mixing=Mixer.Config(policy="static", weights={"markov": 0.8, "noise": 0.1},
                                                    floor=0.0, smoothing=0.0))
    loader.mixer.observe({}, {}, {}, {})  # the static weights apply from the first update on
    it = iter(loader)

    def drawn(batches: int) -> list[str]:
        docs = {m.doc_ids[i]: d for m in (next(it)[0]["_meta"] for _ in range(batches))
                for i, d in enumerate(m.doc_domains)}
        return list(docs.values())

    mixed = drawn(8)
    loader.paused.add("markov")
    after_pause = drawn(4)
    loader.close()
    assert len(mixed) > 60 and 0.65 < mixed.count("markov") / len(mixed) < 0.95
    assert {"noise", "counting"} <= set(mixed)
    assert after_pause.count("markov") <= 1  # at most the remainder carried over from before the pause


def test_a_domain_that_starves_mid_batch_is_dropped_from_the_draw_until_it_has_data(tmp_path):
    root = str(tmp_path / "s")
    write_stream(root, domains={"markov": "markov"}, shards=2, per_shard=60, vocab=64)
    loader = mixed_loader(root, domains=["ghost", "markov"], starve_timeout_s=0.3)
    it = iter(loader)
    metas = [next(it)[0]["_meta"] for _ in range(4)]
    loader.close()
    assert [s for m in metas for s in m.starved] == ["ghost"]  # waited for once, then left out
    assert all(set(m.doc_domains) == {"markov"} for m in metas)
    assert loader.starved == {"ghost"}
