"""torchtitan tokenizer over the unified vocabulary (streams.vocab); streams arrive pre-tokenized."""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.components.tokenizer import BaseTokenizer

__all__ = ["UnifiedVocabTokenizer"]


class UnifiedVocabTokenizer(BaseTokenizer):
    """Wraps ``streams.vocab.Vocab.default()`` so torchtitan's Trainer has a tokenizer."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config, *, tokenizer_path: str | None = None):
        super().__init__()
        from streams.vocab import Vocab

        self.vocab = Vocab.default()
        self.eos_id = self.vocab.special("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def get_vocab_size(self) -> int:
        return int(self.vocab.size)
