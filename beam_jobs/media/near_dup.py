"""Image near-dup signals: pHash candidates (multi-index hashing) verified by SSIM and colour.

A :class:`MediaFingerprint` is what the index keeps per image, a fixed ~1.1 KB: a 16-byte
pixel digest (exact dups), the 64-bit DCT pHash, the 32×32 grey thumbnail the pHash was computed
from (SSIM) and a 4×4 RGB thumbnail (mean colours). A pair is a near duplicate only when the
pHashes are within ``hamming_radius`` bits AND the thumbnails' SSIM and colour distance agree.

Multi-index hashing: the 64 bits are split into ``hamming_radius + 1`` chunks, so any pair within
the radius shares at least one chunk value (pigeonhole). ``(chunk index, chunk value)`` is the
bucket key that candidates meet on: the keyed-state shard of the Beam transform and the bucket
of the in-memory :class:`NearDupIndex`.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

__all__ = [
    "FINGERPRINT_META",
    "ID_BYTES",
    "MediaFingerprint",
    "NearDupConfig",
    "NearDupIndex",
    "best_match",
    "bucket_keys",
    "cell_colour_distance",
    "colour_distance",
    "compare",
    "decode",
    "encode",
    "fingerprint",
    "hamming",
    "local_ssim",
    "ssim",
]

FINGERPRINT_META = "_headwater_media_dedup"  # meta key of a kept record's fingerprint (MediaDedup)
ID_BYTES = 48  # ids kept (for ``dup_of``) are truncated to this many bytes
_VERSION = 1
_HEAD = "<BBQe3e"  # version, id length, pHash, detail, spread (float16)
THUMB = 32  # grey thumbnail side (the pHash input)
COLOUR = 4  # RGB thumbnail side
_K = np.arange(THUMB)
_DCT = np.cos(np.pi * (2 * _K[None, :] + 1) * _K[:, None] / (2 * THUMB))  # DCT-II basis rows


def _gauss_matrix(n: int, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """``G @ x`` blurs the columns of x with a normalised Gaussian (edges renormalised)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.where(np.abs(d) <= radius, np.exp(-(d**2) / (2 * sigma**2)), 0.0)
    return g / g.sum(1, keepdims=True)


_G = _gauss_matrix(THUMB)
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


@dataclass(kw_only=True, slots=True)
class NearDupConfig:
    """Thresholds of the near-dup decision (tuned on ``media.lookalikes``, not on evaluation data)."""

    hamming_radius: int = 10  # pHash bits that may differ for a candidate
    min_ssim: float = 0.5  # SSIM of the 32×32 grey thumbnails to confirm a candidate
    max_colour: float = 20.0  # RMS distance (0-255) of the 4×4 RGB thumbnails to confirm it
    far_min_ssim: float = 0.75  # the same two, for pairs beyond the pHash radius (colour route)
    far_max_colour: float = 10.0
    min_coarse: float = 0.6  # correlation of 8×8 grey block means (skipped when one is flat)
    flat_std: float = 4.0  # 8×8 block-mean std below which an image counts as flat
    detail_abs: float = 6.0  # fine-detail RMS may differ by this much...
    detail_rel: float = 0.5  # ...plus this fraction of the larger one
    spread_abs: float = 10.0  # per-channel RGB std may differ by this much...
    spread_rel: float = 0.25  # ...plus this fraction of the larger one
    colour_cell: int = 48  # mean-colour grid cell for the second candidate route (0: pHash only)
    verify: bool = True  # False: pHash alone decides (the old behaviour, for comparison)
    exact: bool = True
    near: bool = True

    def chunks(self) -> list[tuple[int, int]]:
        """(shift, width) of the ``hamming_radius + 1`` chunks of the 64-bit hash."""
        m = self.hamming_radius + 1
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        shifts = np.cumsum([0, *widths[:-1]]).tolist()
        return list(zip(shifts, widths))


class MediaFingerprint(NamedTuple):
    """What the near-dup index keeps per image (also what Beam state and snapshots store)."""

    record_id: str
    coords: tuple[str, int, int] | None  # (topic, partition, offset): never a duplicate of itself
    digest: bytes  # 16-byte BLAKE2b of the decoded pixels and shape
    phash: int  # 64-bit DCT pHash
    thumb: bytes  # THUMB×THUMB uint8 grey
    colour: bytes  # COLOUR×COLOUR×3 uint8 RGB
    detail: float  # RMS grey detail finer than the thumbnail (64×64 minus the upsampled 32×32)
    spread: tuple[float, float, float]  # per-channel RGB std: sees isoluminant colour patterns

    def same_record(self, other: MediaFingerprint) -> bool:
        """Same id or same source coordinates: a retry or replay of one record."""
        return self.record_id == other.record_id or (self.coords is not None and self.coords == other.coords)


def fingerprint(rgb: np.ndarray, record_id: str, coords: tuple[str, int, int] | None = None) -> MediaFingerprint:
    """Fingerprint of one decoded uint8 RGB image."""
    rgb = np.ascontiguousarray(rgb)
    digest = hashlib.blake2b(rgb.tobytes() + str(rgb.shape).encode(), digest_size=16).digest()
    img = Image.fromarray(rgb)
    grey = np.asarray(img.convert("L").resize((THUMB, THUMB), Image.Resampling.LANCZOS), np.uint8)
    low = (_DCT @ grey.astype(np.float64) @ _DCT.T)[:8, :8].reshape(-1)
    bits = np.packbits(low > np.median(low[1:]))
    colour = np.asarray(img.resize((COLOUR, COLOUR), Image.Resampling.BOX), np.uint8)
    grey_img = img.convert("L")
    small = np.asarray(img.resize((2 * THUMB, 2 * THUMB), Image.Resampling.BOX), np.float64)
    fine = np.asarray(grey_img.resize((2 * THUMB, 2 * THUMB), Image.Resampling.LANCZOS), np.float64)
    coarse = np.asarray(Image.fromarray(grey).resize((2 * THUMB, 2 * THUMB), Image.Resampling.BILINEAR), np.float64)
    return MediaFingerprint(record_id, tuple(coords) if coords is not None else None, digest,
                            int.from_bytes(bits.tobytes(), "big"), grey.tobytes(), colour.tobytes(),
                            _f16(np.sqrt(np.mean((fine - coarse) ** 2))),
                            tuple(_f16(v) for v in small.reshape(-1, 3).std(0)))


def _f16(v) -> float:
    """Rounded as stored (float16), so a decoded fingerprint decides exactly like a fresh one."""
    return float(np.float16(v))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _grey(a: bytes) -> np.ndarray:
    return np.frombuffer(a, np.uint8).reshape(THUMB, THUMB).astype(np.float64)


def _ssim_maps(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """SSIM maps (Gaussian window, sigma 1.5) of x against y ([THUMB, THUMB] or a stack of them)."""

    def blur(z):
        return _G @ z @ _G.T

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return ((2 * mx * my + _C1) * (2 * cov + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))


def ssim(a: bytes, b: bytes) -> float:
    """Mean SSIM (Gaussian window, sigma 1.5) of two THUMB×THUMB grey thumbnails."""
    return float(_ssim_maps(_grey(a), _grey(b)).mean())


def local_ssim(a: bytes, b: bytes, *, block: int = 8, shift: int = 2) -> float:
    """The worst block's SSIM of two grey thumbnails, each ``block``×``block`` block of ``a``
    compared with ``b`` moved by up to ``shift`` px (the best of those): low when a region
    differs (an object elsewhere), high when content only moved a little or degraded evenly."""
    x, y = _grey(a), np.pad(_grey(b), shift, mode="edge")
    span = range(-shift, shift + 1)
    moved = np.stack([y[shift + dy : shift + dy + THUMB, shift + dx : shift + dx + THUMB] for dy in span for dx in span])
    n = THUMB // block
    blocks = _ssim_maps(x, moved).reshape(len(moved), n, block, n, block).mean((2, 4))
    return float(blocks.max(0).min())


def coarse_correlation(a: bytes, b: bytes, min_std: float) -> float:
    """Correlation of the 8×8 block means of two grey thumbnails (1.0 when either is nearly flat:
    then coarse structure says nothing)."""
    x = np.frombuffer(a, np.uint8).reshape(8, THUMB // 8, 8, THUMB // 8).mean((1, 3))
    y = np.frombuffer(b, np.uint8).reshape(8, THUMB // 8, 8, THUMB // 8).mean((1, 3))
    if x.std() < min_std or y.std() < min_std:
        return 1.0
    return float(np.corrcoef(x.reshape(-1), y.reshape(-1))[0, 1])


def colour_distance(a: bytes, b: bytes) -> float:
    """RMS difference (0-255) of two RGB colour thumbnails."""
    x = np.frombuffer(a, np.uint8).astype(np.float64)
    y = np.frombuffer(b, np.uint8).astype(np.float64)
    return float(np.sqrt(np.mean((x - y) ** 2)))


def cell_colour_distance(a: bytes, b: bytes) -> float:
    """Largest RGB distance (0-441) between corresponding cells of two colour thumbnails: sees
    a local change (an object elsewhere) that the RMS over all cells averages away."""
    x = np.frombuffer(a, np.uint8).reshape(-1, 3).astype(np.float64)
    y = np.frombuffer(b, np.uint8).reshape(-1, 3).astype(np.float64)
    return float(np.sqrt(((x - y) ** 2).sum(1)).max())


def bucket_keys(fp: MediaFingerprint, config: NearDupConfig) -> list[int]:
    """Keys that candidates meet on, one per column (every image has the same columns).

    Columns ``0..radius``: pHash chunk i has value v (near-dups within the radius share one).
    Then 8 colour columns: the mean colour's cell in a grid shifted by half a cell per channel
    (all 8 shift combinations); a pair whose mean colours differ by less than half a cell per
    channel shares one. The colour route finds duplicates of smooth, low-structure images whose
    pHash bits are unstable. A key packs (column << 40) | value."""
    keys = [(i << 40) | ((fp.phash >> s) & ((1 << w) - 1)) for i, (s, w) in enumerate(config.chunks())]
    if config.colour_cell:
        mean = np.frombuffer(fp.colour, np.uint8).reshape(-1, 3).mean(0)
        for g in range(8):
            shift = np.array([(g >> c) & 1 for c in range(3)]) * (config.colour_cell / 2)
            q = ((mean + shift) // config.colour_cell).astype(int)
            keys.append(((len(keys)) << 40) | int((q[0] << 16) | (q[1] << 8) | q[2]))
    return keys


def encode(fp: MediaFingerprint) -> str:
    """Compact text form (base64, ~1.5 KB) for a sample's lineage and snapshots."""
    rid = fp.record_id.encode("utf-8", "surrogatepass")[:ID_BYTES]
    head = struct.pack(_HEAD, _VERSION, len(rid), fp.phash, fp.detail, *fp.spread)
    return base64.b64encode(head + rid + fp.digest + fp.thumb + fp.colour).decode("ascii")


def decode(text: str, coords: tuple[str, int, int] | None = None) -> MediaFingerprint:
    """Inverse of :func:`encode` (ids are truncated to ``ID_BYTES``)."""
    data = base64.b64decode(text)
    version, n, phash, detail, *spread = struct.unpack_from(_HEAD, data)
    if version != _VERSION:
        raise ValueError(f"media dedup record version {version} is not supported (expected {_VERSION})")
    off = struct.calcsize(_HEAD)
    rid = data[off : off + n].decode("utf-8", "replace")
    off += n
    digest, off = data[off : off + 16], off + 16
    thumb, off = data[off : off + THUMB * THUMB], off + THUMB * THUMB
    colour = data[off : off + COLOUR * COLOUR * 3]
    return MediaFingerprint(rid, coords, digest, phash, thumb, colour, float(detail), tuple(map(float, spread)))


def compare(fp: MediaFingerprint, kept: MediaFingerprint, config: NearDupConfig) -> tuple[str, dict] | None:
    """(reason, evidence) when ``fp`` duplicates ``kept``; None otherwise (or when it is itself)."""
    if fp.same_record(kept):
        return None
    if config.exact and fp.digest == kept.digest:
        return "exact_duplicate", {}
    if not config.near:
        return None
    dist = hamming(fp.phash, kept.phash)
    if not config.verify:
        return ("near_duplicate", {"hamming": dist}) if dist <= config.hamming_radius else None
    far = dist > config.hamming_radius  # met on the colour route only: stricter
    min_ssim, max_colour = (config.far_min_ssim, config.far_max_colour) if far else (config.min_ssim, config.max_colour)
    # Cheapest signals first: most candidates fail on colour or spread before SSIM is computed.
    c = colour_distance(fp.colour, kept.colour)
    if c > max_colour:
        return None
    v = max(abs(a - b) - config.spread_rel * max(a, b) for a, b in zip(fp.spread, kept.spread))
    d = abs(fp.detail - kept.detail)
    if v > config.spread_abs or d > config.detail_abs + config.detail_rel * max(fp.detail, kept.detail):
        return None
    r = coarse_correlation(fp.thumb, kept.thumb, config.flat_std)
    if r < config.min_coarse:
        return None
    s = ssim(fp.thumb, kept.thumb)
    if s < min_ssim:
        return None
    evidence = {"hamming": dist, "ssim": round(s, 4), "colour": round(c, 2), "coarse": round(r, 3),
                "detail": round(d, 2), "spread": round(v, 2)}
    return "near_duplicate", evidence


def best_match(fp, candidates, config, judge=None) -> tuple[str, Any, dict] | None:
    """The closest confirmed duplicate among ``candidates``: exact first, then fewest pHash bits.
    ``judge(fp, kept, config)`` decides one pair (default :func:`compare`; videos pass theirs)."""
    judge = judge or compare
    best = None
    for kept in candidates:
        hit = judge(fp, kept, config)
        if hit is None:
            continue
        rank = (hit[0] != "exact_duplicate", hit[1].get("hamming", 0), -hit[1].get("ssim", 1.0))
        if best is None or rank < best[0]:
            best = (rank, hit[0], kept, hit[1])
    return None if best is None else best[1:]


@dataclass(slots=True)
class NearDupIndex:
    """In-memory multi-index-hash index of fingerprints (one process's view)."""

    config: NearDupConfig = field(default_factory=NearDupConfig)
    entries: list[MediaFingerprint] = field(default_factory=list)
    buckets: dict[int, list[int]] = field(default_factory=dict)
    digests: dict[bytes, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def keys(self, fp: MediaFingerprint) -> list[int]:
        """Bucket keys of ``fp`` (a subclass indexes other fingerprints: videos)."""
        return bucket_keys(fp, self.config)

    def candidates(self, fp: MediaFingerprint) -> list[MediaFingerprint]:
        """Entries sharing a pHash chunk or the digest with ``fp``."""
        rows = {i for key in self.keys(fp) for i in self.buckets.get(key, ())}
        if fp.digest in self.digests:
            rows.add(self.digests[fp.digest])
        return [self.entries[i] for i in sorted(rows)]

    def check(self, fp: MediaFingerprint) -> tuple[str, MediaFingerprint, dict] | None:
        """(reason, matched fingerprint, evidence) or None."""
        return self.judge(fp, self.candidates(fp))

    def judge(self, fp: MediaFingerprint, candidates: list) -> tuple[str, Any, dict] | None:
        return best_match(fp, candidates, self.config)

    def add(self, fp: MediaFingerprint) -> None:
        i = len(self.entries)
        self.entries.append(fp)
        self.digests.setdefault(fp.digest, i)
        for key in self.keys(fp):
            self.buckets.setdefault(key, []).append(i)
