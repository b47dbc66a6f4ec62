"""Unified vocabulary: exact text round-trips, RVQ codes <-> ids, layout, versioning."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.vocab import DEFAULT_SPECIALS, Codebook, Vocab, VocabSpec

ASSET = pathlib.Path(__file__).resolve().parents[1] / "streams" / "assets" / "vocab_default.json"
V = Vocab.default()
MEDIA = [(cb.modality, cb.levels, cb.codes) for cb in V.spec.codebooks]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_text_round_trips_exactly(text):
    ids = V.encode(text)
    assert all(0 <= i < V.text_size for i in ids)
    assert V.decode(ids) == text


@pytest.mark.parametrize("text", ["", " ", "\n\r\t", "héllo wörld 🌊🏞️", "日本語のテキスト", "a" * 5000,
                                  "\u200d\ufeff\U0010ffff", "x\x00y"])
def test_text_round_trips_edge_cases(text):
    assert V.decode(V.encode(text)) == text


@pytest.mark.parametrize("name", DEFAULT_SPECIALS)
def test_special_strings_in_user_text_are_plain_text(name):
    ids = V.encode(f"a {name} b")
    assert V.special(name) not in ids
    assert V.decode(ids) == f"a {name} b"
    assert V.decode([V.special(name)]) == name


def test_lone_surrogate_is_rejected():
    with pytest.raises(ValueError, match="surrogate"):
        V.encode("ok \ud800 bad")


def test_layout_is_contiguous_and_disjoint():
    assert V.text_size == 151_643
    assert V.special("<|endoftext|>") == 151_643  # keeps Qwen's id
    specials = sorted(V.specials.values())
    assert specials == list(range(151_643, 151_643 + len(DEFAULT_SPECIALS)))
    expected_start = specials[-1] + 1
    for modality, levels, codes in MEDIA:
        for level in range(levels):
            r = V.range(modality, level)
            assert (r.start, len(r)) == (expected_start, codes)
            assert V.locate(r.start) == (modality, level) and V.locate(r[-1]) == (modality, level)
            expected_start = r.stop
    assert V.size == expected_start == 151_643 + len(DEFAULT_SPECIALS) + (32 + 8 + 8) * 1024
    assert V.modality_of(0) == "text" and V.modality_of(V.special("<seg>")) == "special"
    for bad in (-1, V.size):
        with pytest.raises(ValueError, match="out of range"):
            V.locate(bad)


@st.composite
def media_codes(draw):
    modality, max_levels, codes = draw(st.sampled_from(MEDIA))
    levels = draw(st.integers(1, max_levels))
    frames = draw(st.integers(0, 40))
    arr = draw(st.lists(st.integers(0, codes - 1), min_size=levels * frames, max_size=levels * frames))
    return modality, np.array(arr, dtype=np.int64).reshape(levels, frames)


@settings(max_examples=200, deadline=None)
@given(media_codes())
def test_codes_ids_round_trip(case):
    modality, codes = case
    levels, frames = codes.shape
    ids = V.codes_to_ids(modality, codes)
    assert ids.dtype == np.int32 and ids.shape == (levels * frames,)
    for f in range(frames):  # frame-major, levels interleaved
        for lv in range(levels):
            assert ids[f * levels + lv] == V.range(modality, lv).start + codes[lv, f]
    np.testing.assert_array_equal(V.ids_to_codes(modality, ids, levels), codes)


@pytest.mark.parametrize("modality,levels,codes", MEDIA)
def test_out_of_range_codes_raise(modality, levels, codes):
    with pytest.raises(ValueError, match=f"code {codes} out of range"):
        V.codes_to_ids(modality, np.full((1, 3), codes))
    with pytest.raises(ValueError, match="code -1 out of range"):
        V.codes_to_ids(modality, np.array([[0, -1]]))
    with pytest.raises(ValueError, match="levels"):
        V.codes_to_ids(modality, np.zeros((levels + 1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        V.codes_to_ids(modality, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        V.codes_to_ids(modality, np.zeros((1, 2), dtype=np.float32))


def test_ids_of_wrong_level_or_modality_raise():
    ids = V.codes_to_ids("audio", np.array([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="level-0"):
        V.ids_to_codes("audio", ids[::-1].copy(), 2)
    with pytest.raises(ValueError, match="not a image"):
        V.ids_to_codes("image", ids, 2)
    with pytest.raises(ValueError, match="multiple of 2"):
        V.ids_to_codes("audio", ids[:3], 2)
    with pytest.raises(ValueError, match="no codebook"):
        V.codes_to_ids("smell", np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="use ids_to_codes"):
        V.decode([int(ids[0])])
    with pytest.raises(ValueError, match="unknown special"):
        V.special("<nope>")


def test_version_is_content_hash_and_json_round_trips():
    assert V.version.startswith("v1-") and len(V.version) == 15
    again = Vocab.from_json(V.to_json())
    assert again.version == V.version and again.size == V.size
    assert json.loads(ASSET.read_text()) == json.loads(V.to_json()), "default spec changed: update the asset"
    assert Vocab.from_json(ASSET.read_text()).version == V.version


def test_spec_is_configurable_and_changes_version():
    spec = VocabSpec(codebooks=(Codebook(modality="audio", levels=8, codes=2048, codec="encodec_24khz"),))
    v = Vocab(spec)
    assert v.version != V.version
    assert v.size == V.text_size + len(DEFAULT_SPECIALS) + 8 * 2048
    assert v.encode("same text") == V.encode("same text")
    codes = np.array([[2047], [0]])
    np.testing.assert_array_equal(v.ids_to_codes("audio", v.codes_to_ids("audio", codes), 2), codes)
    with pytest.raises(ValueError, match="no codebook"):
        v.range("image", 0)


@pytest.mark.parametrize("bad", ["{", '{"specials": []}', json.dumps({**json.loads(V.to_json()), "spec_version": 9}),
                                 json.dumps({**json.loads(V.to_json()), "bpe_sha256": "0" * 64})])
def test_bad_spec_json_raises(bad):
    with pytest.raises(ValueError):
        Vocab.from_json(bad)


def test_loading_is_cheap_to_repeat():
    assert Vocab.default() is V
    t = time.perf_counter()
    for _ in range(20):
        Vocab(VocabSpec())
    assert time.perf_counter() - t < 1.0
