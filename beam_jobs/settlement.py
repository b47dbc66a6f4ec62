"""Resume plans: where each partition restarts, from the offset ranges the stream root settled.

Offsets the broker does not have (compaction, transaction markers) are never settled by a
shard; once the source has seen a record beyond such a gap it marks the gap *absent*
(:meth:`ResumePlan.mark_absent`) so the resume position moves past it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from streams.events import OffsetRange

__all__ = ["ResumePlan"]


@dataclass(slots=True)
class ResumePlan:
    """Settled ranges per (topic, partition), merged and sorted; ``absent``: offset spans known not
    to exist on the broker (settled by absence: skipped by :meth:`start`, not counted)."""

    ranges: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)
    absent: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def from_ranges(cls, ranges: list[OffsetRange]) -> ResumePlan:
        by_tp: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for r in sorted(ranges, key=lambda r: (r.topic, r.partition, r.start)):
            spans = by_tp.setdefault((r.topic, r.partition), [])
            if spans and r.start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], r.end))
            else:
                spans.append((r.start, r.end))
        return cls(by_tp)

    @classmethod
    def of_stream(cls, stream_root: str) -> ResumePlan:
        from streams.mds import settled_ranges

        return cls.from_ranges(settled_ranges(stream_root))

    def start(self, topic: str, partition: int, earliest: int = 0) -> int:
        """First offset to read: the end of the contiguous run of settled or absent offsets
        from ``earliest``."""
        pos = earliest
        for s, e in sorted((*self.ranges.get((topic, partition), ()), *self.absent.get((topic, partition), ()))):
            if s <= pos < e:
                pos = e
            elif s > pos:
                break
        return pos

    def settled_beyond(self, topic: str, partition: int, offset: int) -> bool:
        """Whether some offset after ``offset`` is settled (a resume pinned at ``offset`` then
        may be pinned on a gap: an offset the broker does not have)."""
        spans = self.ranges.get((topic, partition))
        return bool(spans) and spans[-1][1] > offset + 1

    def mark_absent(self, topic: str, partition: int, start: int, end: int) -> None:
        """Record that offsets ``[start, end)`` do not exist on the broker (the first record at or
        after ``start`` has offset ``end``)."""
        if end > start:
            self.absent.setdefault((topic, partition), []).append((start, end))

    def is_settled(self, topic: str, partition: int, offset: int) -> bool:
        spans = self.ranges.get((topic, partition))
        if not spans:
            return False
        i = bisect.bisect_right(spans, (offset, float("inf"))) - 1
        return i >= 0 and spans[i][0] <= offset < spans[i][1]

    def count(self) -> int:
        """Number of settled offsets."""
        return sum(e - s for spans in self.ranges.values() for s, e in spans)
