"""Pack documents into fixed-length rows with document boundaries.

A row holds ``seq_len + 1`` tokens drawn from consecutive documents; ``input`` is
``row[:-1]`` and ``labels`` is ``row[1:]``. ``positions`` restart at 0 at every
document start (torchtitan derives its no-cross-document attention mask from
them), and a label that would cross into the next document is ``IGNORE_INDEX``,
so no loss is taken at boundaries. A document that does not fit is split: its
remainder (from the last token placed) starts the next row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["IGNORE_INDEX", "Doc", "Packer", "Row"]

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


class Packer:
    """Builds rows from a ``next_doc()`` callback; keeps the split remainder between rows."""

    def __init__(self, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len
        self.carry: Doc | None = None

    def pack(self, next_doc: Callable[[], Doc]) -> Row:
        need = self.seq_len + 1
        tokens, positions, doc_index, docs = [], [], [], []
        filled = 0
        while filled < need:
            doc = self.carry if self.carry is not None else next_doc()
            self.carry = None
            if len(doc.tokens) == 0:
                continue
            take = min(len(doc.tokens), need - filled)
            tokens.append(doc.tokens[:take])
            positions.append(np.arange(take))
            doc_index.append(np.full(take, len(docs)))
            docs.append(doc)
            filled += take
            if take < len(doc.tokens):  # the last placed token opens the next row: no label lost
                self.carry = Doc(doc.id, doc.domain, doc.tokens[take - 1:], doc.produced_at, doc.shard, doc.source)
        row = np.concatenate(tokens).astype(np.int64)
        pos = np.concatenate(positions).astype(np.int64)
        idx = np.concatenate(doc_index)
        labels = row[1:].copy()
        labels[pos[1:] == 0] = IGNORE_INDEX  # next token starts another document
        return Row(
            input=row[:-1],
            labels=labels,
            positions=pos[:-1],
            doc_index=idx[:-1],
            docs=docs,
        )

    def state_dict(self) -> dict:
        c = self.carry
        return {"carry": None if c is None else (c.id, c.domain, c.tokens.tolist(), c.produced_at, c.shard, c.source)}

    def load_state_dict(self, state: dict) -> None:
        c = state.get("carry")
        self.carry = None if c is None else Doc(c[0], c[1], np.asarray(c[2], dtype=np.int32), *c[3:])

    def drop_carry(self, *, shards: set[str] = frozenset(), sources: set[str] = frozenset()) -> bool:
        """Forget the carried remainder if it comes from a quarantined shard or source."""
        c = self.carry
        if c is not None and (c.shard in shards or c.source in sources):
            self.carry = None
            return True
        return False
