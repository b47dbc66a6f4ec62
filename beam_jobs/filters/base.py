"""The filter protocol and the Beam step that runs one filter with per-reason drop counters.

A filter is a small class in the datatrove style: ``filter(doc)`` returns
``True`` to keep the document (possibly after rewriting ``doc.text``) or
``(False, reason)`` to drop it. Every drop is counted with its reason.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_jobs.records import Doc

__all__ = ["FilterResult", "FilterStep", "TextFilter", "run_filters"]

FilterResult = bool | tuple[bool, str]


@runtime_checkable
class TextFilter(Protocol):
    """One text filter; ``name`` labels its Beam step and its counters."""

    name: str

    def filter(self, doc: Doc) -> FilterResult: ...


def _verdict(result: FilterResult) -> tuple[bool, str]:
    if result is True:
        return True, ""
    if isinstance(result, tuple) and len(result) == 2 and result[0] is False:
        return False, str(result[1])
    if result is False:
        return False, "rejected"
    raise TypeError(f"a filter must return True or (False, reason), got {result!r}")


def run_filters(filters: list[TextFilter], doc: Doc) -> Doc:
    """Apply filters in order outside Beam (benchmarks, tools); stops at the first drop."""
    for f in filters:
        keep, reason = _verdict(f.filter(doc))
        if not keep:
            return doc.drop(f.name, reason)
    return doc


class _FilterFn(beam.DoFn):
    def __init__(self, text_filter: TextFilter):
        self.text_filter = text_filter
        name = text_filter.name
        self.n_in = Metrics.counter(f"filter.{name}", "in")
        self.n_out = Metrics.counter(f"filter.{name}", "out")

    def setup(self):
        setup = getattr(self.text_filter, "setup", None)
        if setup is not None:
            setup()

    def process(self, doc: Doc):
        if doc.dropped is None:
            self.n_in.inc()
            name = self.text_filter.name
            try:
                keep, reason = _verdict(self.text_filter.filter(doc))
            except Exception as e:  # noqa: BLE001 - a filter failing on one document dead-letters only it
                Metrics.counter(f"filter.{name}", "dlq_filter_error").inc()
                yield doc.fail(f"filter.{name}", "filter_error", f"{type(e).__name__}: {e}")
                return
            if keep:
                self.n_out.inc()
            else:
                Metrics.counter(f"filter.{self.text_filter.name}", f"drop_{reason}").inc()
                doc.drop(self.text_filter.name, reason)
        yield doc


class FilterStep(beam.PTransform):
    """Run one :class:`TextFilter` over Docs; dropped docs pass through marked, so their offsets settle."""

    def __init__(self, text_filter: TextFilter):
        super().__init__(label=f"Filter/{text_filter.name}")
        self.text_filter = text_filter

    def expand(self, docs):
        return docs | beam.ParDo(_FilterFn(self.text_filter))
