"""Tokenize kept text Docs with the unified vocabulary into TokenizedSamples, labelled by domain."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.records import Doc, Outcome
from streams.events import TokenizedSample

__all__ = ["PIPELINE_VERSION", "TOKENIZER_VERSION", "DomainMap", "TokenizeText", "by_source"]

PIPELINE_VERSION = "ingest-text-1"
TOKENIZER_VERSION = "qwen-bpe-tiktoken"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(kw_only=True, slots=True)
class DomainMap:
    """Domain label = f(source, language): explicit ``"source:language"`` entries, then a template.

    ``"*"`` matches any source or language in a mapping key. Labels are sanitised to
    ``[A-Za-z0-9_-]`` (they become part of shard names).
    """

    template: str = "{source}_{language}"
    mapping: dict[str, str] = field(default_factory=dict)

    def domain(self, source: str, language: str) -> str:
        lang = language or "und"
        for key in (f"{source}:{lang}", f"{source}:*", f"*:{lang}", "*:*"):
            if key in self.mapping:
                label = self.mapping[key]
                break
        else:
            label = self.template.format(source=source, language=lang)
        label = _UNSAFE.sub("-", label).strip("-_")[:64]
        return label or "unknown"


def by_source(source: str, kind: str) -> None:
    """Per-source counter ``by_source/<source>|<kind>`` (kinds: in, docs, dup, pii); see data_metrics."""
    Metrics.counter("by_source", f"{source}|{kind}").inc()


class _TokenizeFn(beam.DoFn):
    def __init__(self, domains: DomainMap, append_eos: bool):
        self.domains, self.append_eos = domains, append_eos

    def setup(self):
        from streams.vocab import Vocab

        self.vocab = Vocab.default()
        self.eos = self.vocab.special("<|endoftext|>")

    def process(self, doc: Doc):
        by_source(doc.source, "in")
        if doc.dead is not None:
            yield Outcome(doc.coords, dead=doc.dead, record_id=doc.id)
            return
        if doc.dropped is not None:
            if doc.dropped.startswith("dedup:"):
                by_source(doc.source, "dup")
            yield Outcome(doc.coords, dropped=doc.dropped, record_id=doc.id, dup_of=doc.lineage.get("dup_of"),
                          source=doc.source)
            return
        try:
            tokens = self.vocab.encode(doc.text)
        except Exception as e:  # noqa: BLE001 - a document the tokenizer rejects is dead-lettered alone
            Metrics.counter("tokenize", "dlq_tokenizer_error").inc()
            yield Outcome(doc.coords, dead=doc.fail("tokenize", "tokenizer_error", f"{type(e).__name__}: {e}").dead,
                          record_id=doc.id)
            return
        if self.append_eos:
            tokens.append(self.eos)
        domain = self.domains.domain(doc.source, doc.language)
        Metrics.counter("tokenize", "docs").inc()
        by_source(doc.source, "docs")
        Metrics.counter("tokenize", "tokens").inc(len(tokens))
        Metrics.counter("language", doc.language or "und").inc()
        pii = doc.lineage.get("pii")
        if pii:
            Metrics.counter("pii", "docs").inc()
            by_source(doc.source, "pii")
            for kind, n in pii.items():
                Metrics.counter("pii", kind).inc(n)
        lineage = dict(doc.lineage)
        lineage["kafka"] = list(doc.coords)
        sample = TokenizedSample(
            id=doc.id,
            domain=domain,
            modality="text",
            tokens=tokens,
            source=doc.source,
            license=doc.license,
            pipeline_version=PIPELINE_VERSION,
            language=doc.language,
            tokenizer_version=TOKENIZER_VERSION,
            vocab_version=self.vocab.version,
            lineage=lineage,
        )
        yield Outcome(doc.coords, sample=sample)


class TokenizeText(beam.PTransform):
    """Doc -> Outcome: a TokenizedSample for kept docs, a ``dropped`` marker for the rest."""

    def __init__(self, domains: DomainMap | None = None, *, append_eos: bool = True):
        super().__init__()
        self.domains = domains or DomainMap()
        self.append_eos = append_eos

    def expand(self, docs):
        return docs | beam.ParDo(_TokenizeFn(self.domains, self.append_eos))
