"""Image dedup: exact (SHA-256 of decoded pixels) and near-dup (DCT pHash in a FAISS binary index)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import faiss
import numpy as np
from PIL import Image

__all__ = ["ImageDeduper", "phash"]

_N = 32
_K = np.arange(_N)
_DCT = np.cos(np.pi * (2 * _K[None, :] + 1) * _K[:, None] / (2 * _N))  # DCT-II basis rows


def phash(rgb: np.ndarray) -> np.ndarray:
    """64-bit perceptual hash as 8 uint8: low 8×8 DCT coefficients of a 32×32 grey image vs their median."""
    grey = Image.fromarray(rgb).convert("L").resize((_N, _N), Image.Resampling.LANCZOS)
    g = np.asarray(grey, np.float64)
    low = (_DCT @ g @ _DCT.T)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return np.packbits(bits)


class ImageDeduper:
    """Remembers kept images; ``check`` returns None (new, now remembered) or a duplicate reason."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        hamming_radius: int = 10  # pHash bits that may differ for a near-duplicate
        exact: bool = True
        near: bool = True

        def build(self) -> ImageDeduper:
            return ImageDeduper(self)

    def __init__(self, config: ImageDeduper.Config):
        self.config = config
        self.exact: set[bytes] = set()
        self.index = faiss.IndexBinaryFlat(64)

    def check(self, rgb: np.ndarray) -> tuple[str | None, dict]:
        """(reason or None, evidence) for one decoded image; kept images are added to the index."""
        digest = hashlib.sha256(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode()).digest()
        if self.config.exact and digest in self.exact:
            return "exact_duplicate", {}
        code = phash(rgb)[None]
        if self.config.near and self.index.ntotal:
            dist, _ = self.index.search(code, 1)
            if dist[0, 0] <= self.config.hamming_radius:
                return "near_duplicate", {"hamming": int(dist[0, 0])}
        self.exact.add(digest)
        self.index.add(code)
        return None, {"phash": code[0].tobytes().hex()}
