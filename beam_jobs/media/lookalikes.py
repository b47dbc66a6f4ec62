"""A generated image near-dup set: planted near-duplicates among distinct look-alike images.

Distinct images are drawn from families that fool a bare pHash: smooth linear and radial
gradients (different directions and colours), smoothed-noise textures at different seeds and
scales, checkerboards and stripes of different scales, and ``synth.procedural_image`` scenes.
Planted near-duplicates of some of them are JPEG re-encodes, resizes, small crops,
brightness/contrast shifts, small noise and a watermark text. Each image carries a cluster id:
images of one cluster are duplicates of each other, images of different clusters are not.
Used to tune the near-dup thresholds (``bench/bench_media_dedup.py``, tests), never on
evaluation data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .synth import procedural_image

__all__ = ["EDITS", "FAMILIES", "LabelledImage", "Score", "distinct_image", "generate", "near_duplicate", "score", "tally"]

FAMILIES = ("procedural", "linear_gradient", "radial_gradient", "smooth_noise", "checkerboard", "stripes")
EDITS = ("jpeg", "resize", "crop", "brightness_contrast", "noise", "watermark")


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """One image of the set: ``cluster`` groups an original with its planted duplicates."""

    name: str
    cluster: int
    rgb: np.ndarray
    edit: str = ""  # "" for an original


def _colours(r: np.random.Generator, n: int) -> np.ndarray:
    return r.uniform(0, 255, (n, 3))


def distinct_image(family: str, seed: int, size: int = 128) -> np.ndarray:
    """uint8 RGB [size, size, 3] of one look-alike family, parameters drawn from ``seed``."""
    r = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size - 0.5
    if family == "procedural":
        return procedural_image(seed, (size, size))
    if family == "linear_gradient":
        angle = r.uniform(0, 2 * np.pi)
        t = np.clip((xx * np.cos(angle) + yy * np.sin(angle)) / 0.71 + 0.5, 0, 1)
        c0, c1 = _colours(r, 2)
        a = c0 + (c1 - c0) * t[..., None]
    elif family == "radial_gradient":
        cx, cy = r.uniform(-0.4, 0.4, 2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / 0.9, 0, 1)
        c0, c1 = _colours(r, 2)
        a = c0 + (c1 - c0) * t[..., None]
    elif family == "smooth_noise":
        cells = int(r.integers(3, 9))
        low = r.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        a = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), np.float64)
        a += r.normal(0, 6, a.shape)
    elif family == "checkerboard":
        cell = int(r.choice([4, 6, 8, 12, 16, 24, 32]))
        phase = r.integers(0, cell, 2)
        board = (((np.arange(size)[:, None] + phase[0]) // cell + (np.arange(size)[None, :] + phase[1]) // cell) % 2)
        c0, c1 = _colours(r, 2)
        a = np.where(board[..., None] == 1, c1, c0)
    elif family == "stripes":
        angle, freq = r.uniform(0, np.pi), r.uniform(2, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + r.uniform(0, 6))
        c0, c1 = _colours(r, 2)
        a = c0 + (c1 - c0) * t[..., None]
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return np.clip(a, 0, 255).astype(np.uint8)


def near_duplicate(rgb: np.ndarray, edit: str, seed: int) -> np.ndarray:
    """A planted near-duplicate of ``rgb`` made by one ``edit``."""
    r = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb)
    if edit == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(r.integers(30, 71)))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    if edit == "resize":
        f = r.uniform(0.5, 0.85)
        return np.asarray(img.resize((max(32, round(w * f)), max(32, round(h * f))), Image.Resampling.BILINEAR))
    if edit == "crop":
        dx, dy = (r.uniform(0.01, 0.05, 2) * (w, h)).astype(int) + 1
        x0, y0 = int(r.integers(0, dx + 1)), int(r.integers(0, dy + 1))
        return np.ascontiguousarray(rgb[y0 : h - (dy - y0), x0 : w - (dx - x0)])
    if edit == "brightness_contrast":
        gain, bias = r.uniform(0.9, 1.1), r.uniform(-10, 10)
        return np.clip((rgb.astype(np.float64) - 128) * gain + 128 + bias, 0, 255).astype(np.uint8)
    if edit == "noise":
        return np.clip(rgb + r.normal(0, r.uniform(3, 8), rgb.shape), 0, 255).astype(np.uint8)
    if edit == "watermark":
        draw = ImageDraw.Draw(img)
        x, y = int(r.integers(2, w // 3)), int(r.integers(h // 2, h - 14))
        draw.text((x, y), "© stock", fill=(255, 255, 255))
        return np.asarray(img)
    raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")


def generate(n_distinct: int, *, dup_fraction: float = 0.4, seed: int = 0, size: int = 128) -> list[LabelledImage]:
    """``n_distinct`` originals (families round-robin), then 1-2 planted near-duplicates of a
    ``dup_fraction`` of them; shuffled, so a duplicate may arrive before its original."""
    r = np.random.default_rng(seed)
    out: list[LabelledImage] = []
    for i in range(n_distinct):
        family = FAMILIES[i % len(FAMILIES)]
        rgb = distinct_image(family, seed * 1_000_003 + i, size)
        out.append(LabelledImage(f"{family}-{i}", i, rgb))
        if r.random() < dup_fraction:
            for k, edit in enumerate(r.choice(EDITS, size=int(r.integers(1, 3)), replace=False)):
                out.append(LabelledImage(f"{family}-{i}~{edit}", i, near_duplicate(rgb, str(edit), int(r.integers(1 << 31))),
                                         str(edit)))
    return [out[j] for j in r.permutation(len(out))]


@dataclass(frozen=True, slots=True)
class Score:
    """Precision/recall of near-dup drops against the clusters."""

    precision: float
    recall: float
    drops: int
    true_drops: int
    planted: int  # images that duplicate an earlier image of their cluster
    false_drops: tuple[tuple[str, str], ...]  # (dropped, matched) across clusters
    missed: tuple[str, ...]


def score(images: list[LabelledImage], config) -> Score:
    """Run the images in order through a :class:`near_dup.NearDupIndex` built from ``config``."""
    from .near_dup import NearDupIndex, fingerprint

    return tally(images, NearDupIndex(config), lambda im: fingerprint(im.rgb, im.name))


def tally(items, index, fingerprint_of) -> Score:
    """Run labelled ``items`` (``name``, ``cluster``) in order through ``index`` (``check``/``add``).

    A drop is true when it matched an item of its own cluster; every item after the first of
    its cluster should be dropped (recall's denominator)."""
    cluster = {im.name: im.cluster for im in items}
    seen: set[int] = set()
    drops = true = planted = 0
    false, missed = [], []
    for im in items:
        fp = fingerprint_of(im)
        dup = im.cluster in seen
        planted += dup
        seen.add(im.cluster)
        hit = index.check(fp)
        if hit is None:
            index.add(fp)
            if dup:
                missed.append(im.name)
            continue
        drops += 1
        if cluster[hit[1].record_id] == im.cluster:
            true += 1
        else:
            false.append((im.name, hit[1].record_id))
    return Score(true / drops if drops else 1.0, true / planted if planted else 1.0, drops, true, planted,
                 tuple(false), tuple(missed))
