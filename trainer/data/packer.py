"""Pack documents into fixed-length rows with document boundaries.

A row holds ``seq_len + 1`` tokens drawn from consecutive documents; ``input`` is
``row[:-1]`` and ``labels`` is ``row[1:]``. ``positions`` restart at 0 at every
document start (torchtitan derives its no-cross-document attention mask from
them), and a label that would cross into the next document is ``IGNORE_INDEX``,
so no loss is taken at boundaries. A document that does not fit is split: its
remainder (from the last token placed) starts the next row.

:meth:`Packer.pack_batch` fills a whole batch at once: the per-document work is one
slice copy; positions, labels and document indices are computed for the batch in a
few vectorised numpy operations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from streams.source_names import canonical_source

__all__ = ["IGNORE_INDEX", "Doc", "PackedBatch", "Packer", "Row"]

IGNORE_INDEX = -100


@dataclass(slots=True)
class Doc:
    """One stream sample (or the remainder of one) waiting to be packed."""

    id: str
    domain: str
    tokens: np.ndarray
    produced_at: float = 0.0
    shard: str = ""
    source: str = ""
    root: int = 0  # index of its stream root
    index: int = -1  # sample index in its shard
    offset: int = 0  # position of ``tokens[0]`` in the sample (a split document's remainder)
    license: str = ""


@dataclass(slots=True)
class Row:
    input: np.ndarray  # int64 [L]
    labels: np.ndarray  # int64 [L]
    positions: np.ndarray  # int64 [L]
    doc_index: np.ndarray  # int64 [L]: index into ``docs`` of each input position
    docs: list[Doc] = field(default_factory=list)  # documents (or parts) placed in this row

    @property
    def domains(self) -> list[str]:
        """Domain of each input/label position."""
        return [self.docs[i].domain for i in self.doc_index]


@dataclass(slots=True)
class PackedBatch:
    """``rows`` packed rows as contiguous [rows, L] arrays."""

    input: np.ndarray  # int64 [B, L]
    labels: np.ndarray  # int64 [B, L]
    positions: np.ndarray  # int64 [B, L]
    doc_index: np.ndarray  # int64 [B, L]: index into ``docs`` of each input position
    docs: list[Doc]  # documents (or parts) in row order; a split document appears once per row


class Packer:
    """Builds rows from a ``next_doc()`` callback; keeps the split remainder between rows."""

    def __init__(self, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len
        self.carry: Doc | None = None

    def pack(self, next_doc: Callable[[], Doc]) -> Row:
        b = self.pack_batch(next_doc, 1)
        return Row(input=b.input[0], labels=b.labels[0], positions=b.positions[0], doc_index=b.doc_index[0],
                   docs=b.docs)

    def pack_batch(self, next_doc: Callable[[], Doc], rows: int) -> PackedBatch:
        need = self.seq_len + 1
        flat = np.empty(rows * need, dtype=np.int64)  # row r is flat[r * need:(r + 1) * need]
        starts: list[int] = []
        lengths: list[int] = []
        docs: list[Doc] = []
        at = 0
        for r in range(1, rows + 1):
            end = r * need
            while at < end:
                doc = self.carry if self.carry is not None else next_doc()
                self.carry = None
                n = len(doc.tokens)
                if n == 0:
                    continue
                take = min(n, end - at)
                flat[at:at + take] = doc.tokens[:take]
                starts.append(at)
                lengths.append(take)
                docs.append(doc)
                at += take
                if take < n:  # the last placed token opens the next row: no label lost
                    self.carry = Doc(doc.id, doc.domain, doc.tokens[take - 1:], doc.produced_at, doc.shard,
                                     doc.source, doc.root, doc.index, doc.offset + take - 1, doc.license)
        tokens = flat.reshape(rows, need)
        pos = (np.arange(rows * need) - np.repeat(starts, lengths)).reshape(rows, need)
        labels = tokens[:, 1:].copy()
        # a document starting inside a row: the label before it would cross the boundary
        labels.reshape(-1)[[s - s // need - 1 for s in starts if s % need]] = IGNORE_INDEX
        return PackedBatch(
            input=np.ascontiguousarray(tokens[:, :-1]),
            labels=labels,
            positions=np.ascontiguousarray(pos[:, :-1]),
            doc_index=np.repeat(np.arange(len(docs)), lengths).reshape(rows, need)[:, :-1],
            docs=docs,
        )

    def state_dict(self) -> dict:
        """The carried remainder as a reference (root, shard, sample index, offset), not its tokens."""
        c = self.carry
        return {"carry": None if c is None else
                (c.id, c.domain, c.produced_at, c.shard, c.source, c.root, c.index, c.offset, c.license)}

    def load_state_dict(self, state: dict, fetch: Callable[[int, str, int], np.ndarray]) -> None:
        """Restore; ``fetch(root, shard, index)`` re-reads the tokens of the carried sample."""
        c = state.get("carry")
        if c is None:
            self.carry = None
            return
        doc_id, domain, produced_at, shard, source, root, index, offset, *rest = c  # rest: license (newer)
        tokens = fetch(root, shard, index)[offset:]
        if not len(tokens):  # the sample was taken down since: nothing is carried over
            self.carry = None
            return
        self.carry = Doc(doc_id, domain, tokens, produced_at, shard, source, root, index, offset,
                         rest[0] if rest else "")

    def drop_carry(self, *, shards: set[str] = frozenset(), sources: set[str] = frozenset()) -> bool:
        """Forget the carried remainder if it comes from a quarantined shard or source."""
        c = self.carry
        if c is not None and (c.shard in shards or canonical_source(c.source) in {canonical_source(s) for s in sources}):
            self.carry = None
            return True
        return False
