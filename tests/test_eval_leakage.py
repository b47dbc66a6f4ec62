"""Leakage: eval items planted in a real training MDS stream are found, with their training source."""

from __future__ import annotations

import random

import numpy as np
import pytest

from beam_jobs.dedup.index import DedupConfig
from evaluators.evalsets import EvalItem
from evaluators.leakage import LeakageDetector
from streams.mds import LiveStreamWriter
from streams.vocab import Vocab

WORDS = ["river", "stone", "market", "signal", "harbor", "lantern", "copper", "meadow", "orbit", "canvas", "thunder", "pilot", "garden", "engine", "violet", "ladder", "summit", "quartz", "velvet", "candle", "mirror", "saddle"]


def sentence(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab.default()


def row(vocab: Vocab, i: str, text: str, source: str, domain: str = "web") -> dict:
    return {"id": i, "domain": domain, "modality": "text", "tokens": np.asarray(vocab.encode(text), np.int32),
            "source": source, "license": "cc-by", "pipeline_version": "p1", "language": "en",
            "produced_at": 0.0, "lineage": {}}


def test_planted_eval_items_are_detected_with_their_training_source(tmp_path, vocab):
    rng = random.Random(7)
    eval_texts = {f"eval-{i}": sentence(rng) for i in range(12)}
    items = [EvalItem(id=k, modality="text", domain="web", language="en", source="heldout",
                      tokens=np.asarray(vocab.encode(t), np.int64)) for k, t in eval_texts.items()]
    media = EvalItem(id="eval-img", modality="image", domain="img", language="", source="heldout",
                     tokens=np.arange(vocab.text_size + 100, vocab.text_size + 400, dtype=np.int64), images=1)
    root = tmp_path / "train"
    with LiveStreamWriter(root, writer_id="w", manifest={"vocab_version": vocab.version}) as w:
        w.write_shard([row(vocab, f"clean-{i}", sentence(rng), "crawl") for i in range(60)], domain="web")
        near = eval_texts["eval-3"].replace("river", "rivers", 1)  # a near copy: one word changed
        planted = [row(vocab, "p-exact", eval_texts["eval-1"], "forum"),
                   row(vocab, "p-near", near, "forum"),
                   row(vocab, "p-case", eval_texts["eval-5"].upper(), "blog")]
        w.write_shard([row(vocab, f"clean2-{i}", sentence(rng), "crawl") for i in range(20)] + planted, domain="web")
    det = LeakageDetector(items + [media], decode_text=vocab.decode, text_size=vocab.text_size,
                          train_roots=[str(root)], config=DedupConfig(shard_key="none"))
    try:
        leaks = {leak.eval_id: leak for leak in det.scan()}
        assert set(leaks) == {"eval-1", "eval-3", "eval-5"}
        assert leaks["eval-1"].kind == "exact" and leaks["eval-1"].source == "forum"
        assert leaks["eval-1"].train_id == "p-exact" and leaks["eval-1"].stream_root == str(root)
        assert leaks["eval-3"].kind == "near" and leaks["eval-5"].source == "blog"
        assert det.scan() == []  # nothing new published
        # the media item leaks when its token sequence shows up in a later shard
        with LiveStreamWriter(root, writer_id="w2", manifest={"vocab_version": vocab.version}) as w:
            w.write_shard([{**row(vocab, "p-img", "x", "imgsite", "img"), "modality": "image",
                            "tokens": media.tokens.astype(np.int32)}], domain="img")
        (img,) = det.scan()
        assert img.eval_id == "eval-img" and img.source == "imgsite" and img.kind == "exact"
    finally:
        det.close()


def test_semantic_faiss_index_catches_paraphrase_minhash_misses(tmp_path, vocab):
    eval_text = "The committee approved the new budget for public libraries after a long debate on Tuesday."
    paraphrase = "After a lengthy Tuesday debate, the committee passed the new public library budget."
    items = [EvalItem(id="e", modality="text", domain="news", language="en", source="heldout",
                      tokens=np.asarray(vocab.encode(eval_text), np.int64))]
    root = tmp_path / "train"
    with LiveStreamWriter(root, writer_id="w", manifest={"vocab_version": vocab.version}) as w:
        w.write_shard([row(vocab, "para", paraphrase, "news-site", "news"),
                       row(vocab, "other", "Recipe: whisk two eggs with flour and bake for twenty minutes.", "food", "news")],
                      domain="news")
    minhash_only = LeakageDetector(items, decode_text=vocab.decode, text_size=vocab.text_size,
                                   train_roots=[str(root)], config=DedupConfig(shard_key="none"))
    assert minhash_only.scan() == []
    minhash_only.close()
    det = LeakageDetector(items, decode_text=vocab.decode, text_size=vocab.text_size, train_roots=[str(root)],
                          config=DedupConfig(shard_key="none", semantic=True, semantic_threshold=0.8))
    (leak,) = det.scan()
    det.close()
    assert leak.kind == "semantic" and leak.train_id == "para" and leak.source == "news-site"
