"""Token layout of media samples in the unified vocabulary.

Rules (the vocab's ``codes_to_ids`` flattens codes[levels, frames] frame-major with levels
interleaved: f0l0 f0l1 … f0lL f1l0 …, each level in its own (modality, level) id range):

- image: ``[caption] <img> ids(image, codes[levels, positions]) </img>``
- audio: ``[caption] <aud> ids(audio, codes[levels, frames]) </aud>``
- video: ``[caption] <vid> (<seg> ids(video, keyframe codes) [<aud> ids(audio, codes of the
  segment's time span) </aud>])* </vid>``; segment i spans keyframe i's time to keyframe i+1's.

Captions/ALT text (``meta["caption"]``) are BPE-encoded and placed before the media.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["audio_tokens", "default_vocab", "image_tokens", "video_tokens"]


def default_vocab() -> Any:
    """The shared ``streams.vocab.Vocab.default()`` (imported lazily)."""
    from streams.vocab import Vocab

    return Vocab.default()


def _caption(vocab: Any, caption: str | None) -> list[np.ndarray]:
    return [np.asarray(vocab.encode(caption), np.int32)] if caption else []


def _wrap(vocab: Any, open_: str, close: str, body: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray([vocab.special(open_)], np.int32), *body, np.asarray([vocab.special(close)], np.int32)]


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int32).reshape(-1) for p in parts]).astype(np.int32)


def image_tokens(vocab: Any, codes: np.ndarray, caption: str | None = None) -> np.ndarray:
    """Token ids for one image's codes[levels, positions]."""
    body = [np.asarray(vocab.codes_to_ids("image", codes), np.int32)]
    return _join(_caption(vocab, caption) + _wrap(vocab, "<img>", "</img>", body))


def audio_tokens(vocab: Any, codes: np.ndarray, caption: str | None = None) -> np.ndarray:
    """Token ids for one clip's codes[levels, frames]."""
    body = [np.asarray(vocab.codes_to_ids("audio", codes), np.int32)]
    return _join(_caption(vocab, caption) + _wrap(vocab, "<aud>", "</aud>", body))


def video_tokens(
    vocab: Any, segments: list[tuple[np.ndarray, np.ndarray | None]], caption: str | None = None
) -> np.ndarray:
    """Token ids for a video given (keyframe codes[levels, positions], audio codes or None) per segment."""
    body: list[np.ndarray] = []
    for frame_codes, audio_codes in segments:
        body.append(np.asarray([vocab.special("<seg>")], np.int32))
        body.append(np.asarray(vocab.codes_to_ids("video", frame_codes), np.int32))
        if audio_codes is not None and audio_codes.shape[1]:
            body += _wrap(vocab, "<aud>", "</aud>", [np.asarray(vocab.codes_to_ids("audio", audio_codes), np.int32)])
    return _join(_caption(vocab, caption) + _wrap(vocab, "<vid>", "</vid>", body))
