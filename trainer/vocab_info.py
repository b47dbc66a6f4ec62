"""The unified vocabulary the trainer's models are sized for (from streams.vocab)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VocabInfo", "unified_vocab"]


@dataclass(frozen=True, slots=True)
class VocabInfo:
    size: int
    version: str


def unified_vocab() -> VocabInfo:
    """Size and version of ``streams.vocab.Vocab.default()``."""
    from streams.vocab import Vocab

    vocab = Vocab.default()
    return VocabInfo(size=int(vocab.size), version=str(vocab.version))
