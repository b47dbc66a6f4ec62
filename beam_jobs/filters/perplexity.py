"""Perplexity filter with a pluggable small causal LM loaded from a local path."""

from __future__ import annotations

import math
from dataclasses import dataclass

from beam_jobs.filters.base import FilterResult
from beam_jobs.records import Doc

__all__ = ["PerplexityFilter"]


class PerplexityFilter:
    """Drops documents whose perplexity under a small causal LM exceeds ``max_perplexity``.

    ``model_path`` is a local Hugging Face causal-LM directory. Its tokenizer is
    used when the directory has one; with ``tokenizer="bytes"`` the text's UTF-8
    bytes are the ids (for byte-level models).
    """

    name = "perplexity"

    @dataclass(kw_only=True, slots=True)
    class Config:
        model_path: str
        max_perplexity: float
        tokenizer: str = "auto"  # "auto" (from model_path) or "bytes"
        max_tokens: int = 512

        def build(self) -> PerplexityFilter:
            return PerplexityFilter(self)

    def __init__(self, config: PerplexityFilter.Config):
        self.config = config
        self._model = self._tokenizer = None

    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        self.config, self._model, self._tokenizer = state["config"], None, None

    def setup(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self._model = AutoModelForCausalLM.from_pretrained(self.config.model_path, local_files_only=True).eval()
        if self.config.tokenizer == "auto":
            self._tokenizer = AutoTokenizer.from_pretrained(self.config.model_path, local_files_only=True)

    def _ids(self, text: str) -> list[int]:
        if self._tokenizer is None:
            return list(text.encode("utf-8"))[: self.config.max_tokens]
        return self._tokenizer(text, truncation=True, max_length=self.config.max_tokens)["input_ids"]

    def perplexity(self, text: str) -> float:
        import torch

        self.setup()
        ids = self._ids(text)
        if len(ids) < 2:
            return float("inf")
        x = torch.tensor([ids])
        with torch.no_grad():
            loss = self._model(input_ids=x, labels=x).loss
        return math.exp(min(float(loss), 50.0))

    def filter(self, doc: Doc) -> FilterResult:
        ppl = self.perplexity(doc.text)
        doc.lineage["perplexity"] = round(ppl, 2)
        if ppl > self.config.max_perplexity:
            return False, "high_perplexity"
        return True
