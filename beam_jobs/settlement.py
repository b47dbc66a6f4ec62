"""Resume plans: where each partition restarts, from the offset ranges the stream root settled."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from streams.events import OffsetRange

__all__ = ["ResumePlan"]


@dataclass(slots=True)
class ResumePlan:
    """Settled ranges per (topic, partition), merged and sorted."""

    ranges: dict[tuple[str, int], list[tuple[int, int]]] = field(default_factory=dict)

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
        """First offset to read: the end of the contiguous settled run from ``earliest``."""
        pos = earliest
        for s, e in self.ranges.get((topic, partition), ()):
            if s <= pos < e:
                pos = e
            elif s > pos:
                break
        return pos

    def is_settled(self, topic: str, partition: int, offset: int) -> bool:
        spans = self.ranges.get((topic, partition))
        if not spans:
            return False
        i = bisect.bisect_right(spans, (offset, float("inf"))) - 1
        return i >= 0 and spans[i][0] <= offset < spans[i][1]

    def count(self) -> int:
        """Number of settled offsets."""
        return sum(e - s for spans in self.ranges.values() for s, e in spans)
