"""Image RVQ tokenizer: a fixed grid of patches quantized by FAISS ``ResidualQuantizer`` codebooks.

An image is centre-cropped to a square, resized to ``side``×``side``, cut into ``grid``×``grid``
patches (positions, row-major), and each patch (pixels in [0, 1]) is coded by ``levels`` residual
codebooks of ``2**nbits`` entries. ``decode`` sums the chosen codewords and reassembles the image,
so reconstruction quality (PSNR) is measurable. Codebooks are trained offline (``headwater
discretizer train``) and stored as a versioned artifact directory ``image-rvq-<sha12>``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

__all__ = ["RVQImageTokenizer", "psnr", "square_resize"]

ARTIFACT_KIND = "faiss_rvq"


def square_resize(rgb: np.ndarray, side: int) -> np.ndarray:
    """Centre-crop to a square and resize to side×side (uint8 RGB)."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(rgb[top : top + s, left : left + s])
    return np.asarray(img.resize((side, side), Image.Resampling.BICUBIC))


def psnr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """PSNR in dB between two uint8 images."""
    mse = np.mean((reference.astype(np.float64) - estimate.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class RVQImageTokenizer:
    """Image <-> codes[levels, grid*grid]; build from :class:`Config` (untrained) or :meth:`load`."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        side: int = 64  # pixels after resize
        grid: int = 16  # patches per side -> grid² positions
        levels: int = 8
        nbits: int = 10  # 2**nbits codes per level
        beam: int = 1  # encoder beam width (1 = greedy)
        train_iters: int = 20
        max_train_vectors: int = 200_000
        seed: int = 0

        def build(self) -> RVQImageTokenizer:
            return RVQImageTokenizer(self)

    def __init__(self, config: RVQImageTokenizer.Config, rq: faiss.ResidualQuantizer | None = None):
        if config.side % config.grid:
            raise ValueError(f"side {config.side} must be a multiple of grid {config.grid}")
        self.config = config
        self.patch = config.side // config.grid
        self.dim = self.patch * self.patch * 3
        self.rq = rq
        self.version = ""
        if rq is not None:
            self._prepare()

    @property
    def positions(self) -> int:
        return self.config.grid**2

    @property
    def codebook_size(self) -> int:
        return 1 << self.config.nbits

    # -- patches ---------------------------------------------------------------------------
    def patches(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, side, side, 3] -> float32 [N, positions, dim]."""
        n, g, p = images.shape[0], self.config.grid, self.patch
        x = images.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return (x.reshape(n, g * g, self.dim).astype(np.float32) / 255.0)

    def unpatch(self, vectors: np.ndarray) -> np.ndarray:
        """float32 [N, positions, dim] -> uint8 [N, side, side, 3]."""
        n, g, p = vectors.shape[0], self.config.grid, self.patch
        x = vectors.reshape(n, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * p, g * p, 3)
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """Decoded RGB of any size -> the side×side image the tokenizer codes."""
        return square_resize(rgb, self.config.side)

    # -- training / io -----------------------------------------------------------------------
    def train(self, images: np.ndarray) -> RVQImageTokenizer:
        """Train codebooks on uint8 [N, side, side, 3] images."""
        c = self.config
        x = self.patches(images).reshape(-1, self.dim)
        rng = np.random.default_rng(c.seed)
        if x.shape[0] > c.max_train_vectors:
            x = x[rng.choice(x.shape[0], c.max_train_vectors, replace=False)]
        rq = faiss.ResidualQuantizer(self.dim, c.levels, c.nbits)
        rq.max_beam_size = c.beam
        rq.train_type = faiss.ResidualQuantizer.Train_default  # progressive-dim k-means is ~7x slower
        rq.cp.niter = c.train_iters
        rq.cp.seed = c.seed
        rq.cp.max_points_per_centroid = max(1, c.max_train_vectors // self.codebook_size)
        rq.train(np.ascontiguousarray(x))
        self.rq = rq
        self._prepare()
        return self

    def _prepare(self) -> None:
        c = self.config
        self.rq.max_beam_size = c.beam
        self.codebooks = faiss.vector_to_array(self.rq.codebooks).reshape(c.levels, self.codebook_size, self.dim)
        self.version = hashlib.sha256(self.codebooks.tobytes() + json.dumps(asdict(c), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"image-rvq-{self.version}"

    def save(self, root: str | Path, **provenance) -> Path:
        """Write ``root/image-rvq-<version>/`` (codebooks.npy + meta.json); returns the directory."""
        out = Path(root) / self.name
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "codebooks.npy", self.codebooks)
        faiss.write_index(self._as_index(), str(out / "rq.faiss"))
        meta = {"kind": ARTIFACT_KIND, "name": self.name, "version": self.version, "config": asdict(self.config),
                "created_at": time.time(), **provenance}
        (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        return out

    def _as_index(self) -> faiss.IndexResidualQuantizer:
        index = faiss.IndexResidualQuantizer(self.dim, self.config.levels, self.config.nbits)
        index.rq = self.rq
        index.is_trained = True
        return index

    @classmethod
    def load(cls, path: str | Path) -> RVQImageTokenizer:
        """Load an artifact directory written by :meth:`save`; checks kind and version."""
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("kind") != ARTIFACT_KIND:
            raise ValueError(f"{path}: artifact kind {meta.get('kind')!r} is not {ARTIFACT_KIND!r}")
        raw = faiss.read_index(str(path / "rq.faiss"))
        index = faiss.downcast_index(raw)
        tok = cls(cls.Config(**meta["config"]), rq=index.rq)
        tok._owners = (raw, index)  # rq points into the index: keep its owner alive
        if tok.version != meta["version"]:
            raise ValueError(f"{path}: codebooks hash {tok.version} != recorded version {meta['version']}")
        return tok

    # -- coding ------------------------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, side, side, 3] -> int16 codes [N, levels, positions]."""
        if self.rq is None:
            raise RuntimeError("image tokenizer has no codebooks: train or load one")
        n = images.shape[0]
        x = np.ascontiguousarray(self.patches(images).reshape(-1, self.dim))
        packed = self.rq.compute_codes(x)
        codes = _unpack(packed, self.config.levels, self.config.nbits)
        return codes.reshape(n, self.positions, self.config.levels).transpose(0, 2, 1).astype(np.int16)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes [N, levels, positions] -> uint8 [N, side, side, 3] (sum of codewords)."""
        n, levels, pos = codes.shape
        vec = np.zeros((n, pos, self.dim), np.float32)
        for m in range(levels):
            vec += self.codebooks[m][codes[:, m, :].astype(np.int64)]
        return self.unpatch(vec)


def _unpack(packed: np.ndarray, levels: int, nbits: int) -> np.ndarray:
    """FAISS packs codes LSB-first into bytes; return int64 [n, levels]."""
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : levels * nbits]
    return (bits.reshape(-1, levels, nbits).astype(np.int64) << np.arange(nbits)).sum(axis=2)
