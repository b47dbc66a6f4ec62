"""Leakage detection: eval items that also occur in the training streams.

Reuses the ingest dedup machinery (``beam_jobs.dedup``): the eval items go into a
``DedupIndex`` (exact hash + MinHash/LSH verified on the signature, plus the FAISS
MiniLM index when ``semantic`` is on); every training sample is then checked against it.
Text is compared as decoded text; media items as their token-id sequences (the same media
tokenized by the same discretizer gives the same ids). Training roots are followed
incrementally with :class:`streams.mds.TailReader`, so each shard is scanned once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from beam_jobs.dedup.index import DedupConfig, fingerprint, new_index
from beam_jobs.dedup.semantic import embedder
from evaluators.evalsets import EvalItem
from streams.mds import TailReader

__all__ = ["Leak", "LeakageDetector"]


@dataclass(kw_only=True, slots=True)
class Leak:
    """An eval item found in training data, and where."""

    eval_id: str
    kind: str           # exact | near | semantic
    train_id: str
    source: str
    shard: str
    stream_root: str

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class LeakageDetector:
    """Index eval items once; scan training roots incrementally for copies of them."""

    items: Sequence[EvalItem]
    decode_text: Callable[[list[int]], str]
    text_size: int
    train_roots: Sequence[str]
    config: DedupConfig = field(default_factory=lambda: DedupConfig(shard_key="none"))
    leaks: dict[str, Leak] = field(default_factory=dict)
    _index: object = None
    _hasher: object = None
    _readers: list[TailReader] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = new_index(self.config)
        self._hasher = hasher = self.config.hasher()
        texts = [self._text(it.modality, it.tokens) for it in self.items]
        embeddings = self._embed(texts)
        for it, text, emb in zip(self.items, texts, embeddings):
            self._index.add(fingerprint(it.id, text, self.config, hasher, emb))
        self._readers = [TailReader(root) for root in self.train_roots]

    def _text(self, modality: str, tokens: np.ndarray) -> str:
        if modality == "text":
            return self.decode_text([int(t) for t in tokens if t < self.text_size])
        return " ".join(str(int(t)) for t in tokens)

    def _embed(self, texts: list[str]) -> list:
        if not self.config.semantic:
            return [None] * len(texts)
        return list(embedder(self.config.semantic_model).embed(texts)) if texts else []

    def scan(self) -> list[Leak]:
        """Check training samples published since the last scan; return the new leaks."""
        new: list[Leak] = []
        hasher = self._hasher
        for root, reader in zip(self.train_roots, self._readers):
            batch = list(reader.samples(timeout_s=0))
            texts = [self._text(s["modality"], np.asarray(s["tokens"])) for s in batch]
            for sample, text, emb in zip(batch, texts, self._embed(texts)):
                hit = self._index.check(fingerprint(sample["id"], text, self.config, hasher, emb))
                if hit is None or hit[1] in self.leaks:
                    continue
                leak = Leak(eval_id=hit[1], kind=hit[0], train_id=sample["id"], source=sample.get("source", ""),
                            shard=sample["_shard"], stream_root=root)
                self.leaks[leak.eval_id] = leak
                new.append(leak)
        return new

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
