"""Consumer-group membership of an ingest worker: Kafka's group assignment decides which
partitions this process reads.

The member subscribes to the raw topics with a rebalance listener and keeps every assigned
partition *paused*: it never fetches records itself (the micro-batch source reads the owned
partitions by offset range). :meth:`GroupMember.refresh` runs the group protocol between
micro-batches, so an orderly revoke lands on a settlement boundary: the previous batch has
published, nothing of the revoked partitions is in flight. A member *expelled* mid-batch (a
batch longer than ``max.poll.interval.ms``, a stall past the session timeout) still finishes
its batch while the new owner starts: the writer's overlap check (atomic under the local root's
lock) refuses the later commit with ``OverlapError`` and that worker exits; restart it (samples
are neither lost nor duplicated; that batch's dead letters may be sent twice). The next owner resumes each
partition from the stream root's settled ranges, never from the committed offsets, which
serve lag monitoring only (committed here after settlement and on revoke).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kafka import ConsumerRebalanceListener

from streams import faultpoints

__all__ = ["GroupMember"]

log = logging.getLogger(__name__)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, member: GroupMember):
        self.member = member

    def on_partitions_revoked(self, revoked) -> None:
        self.member._revoked(set(revoked))

    def on_partitions_assigned(self, assigned) -> None:
        self.member._assigned(set(assigned))


class GroupMember:
    """This worker's membership of consumer group ``group`` on ``topics``.

    Args:
        settings: a ``streams.kafka.KafkaSettings``.
        topics: raw topics to share with the group's other members.
        group: the consumer group id (every worker of one ingest job uses the same).
        positions: called on revoke with the revoked partitions; returns their settled resume
            offsets, which are committed before the partitions go (lag monitoring).
        max_poll_interval_ms: the longest a micro-batch may run before the group considers this
            member dead and hands its partitions to another.
    """

    def __init__(self, settings, topics: list[str], group: str, *,
                 positions: Callable[[set], dict] | None = None, max_poll_interval_ms: int = 300_000):
        from streams.kafka import make_consumer

        self.group = group
        self.owned: set = set()
        self.joining = True  # from a revoke (or the start) until the next assignment
        self.generations = 0  # assignments received (each rebalance is one)
        self._positions = positions
        self.consumer = make_consumer(settings, topics=topics, group_id=group, listener=_Listener(self),
                                      max_poll_interval_ms=max_poll_interval_ms)

    def refresh(self, timeout_ms: int = 200, *, join_timeout_s: float = 120.0) -> set:
        """Run the group protocol (join, heartbeat, rebalance callbacks); the partitions owned now.

        A rebalance under way is driven to its end here (up to ``join_timeout_s``): heartbeats
        stop while a member rejoins, so leaving it half-joined for a whole micro-batch would let
        its session expire and restart the rebalance, over and over."""
        deadline = time.monotonic() + join_timeout_s
        self.consumer.poll(timeout_ms=timeout_ms)  # every owned partition is paused: no records are fetched
        while self.joining and time.monotonic() < deadline:
            self.consumer.poll(timeout_ms=timeout_ms)
        return set(self.owned)

    def commit(self, positions: dict) -> None:
        """Commit the settled resume offsets of owned partitions (lag monitoring only; failures,
        e.g. during a rebalance, are logged and ignored)."""
        from kafka.structs import OffsetAndMetadata

        offsets = {tp: OffsetAndMetadata(start, "", -1) for tp, start in positions.items() if tp in self.owned}
        if not offsets:
            return
        try:
            self.consumer.commit(offsets)
        except Exception as e:  # noqa: BLE001 - lag monitoring must never stop ingest
            log.debug("offset commit for lag monitoring failed: %s", e)

    def close(self) -> None:
        """Leave the group (its partitions go to the other members at once)."""
        self.consumer.close()

    def _revoked(self, revoked: set) -> None:
        self.joining = True
        if revoked and self._positions is not None:
            try:
                self.commit(self._positions(revoked))
            except Exception as e:  # noqa: BLE001 - a failed lag commit must not block the rebalance
                log.debug("commit on revoke failed: %s", e)
        if revoked:
            log.info("group %s revoked %s", self.group, _names(revoked))
            faultpoints.reach("group.revoke")
        self.owned -= revoked

    def _assigned(self, assigned: set) -> None:
        self.joining = False
        self.generations += 1
        self.owned = set(assigned)
        if assigned:
            self.consumer.pause(*assigned)
        log.info("group %s assigned %s", self.group, _names(assigned))
        faultpoints.reach("group.assign")


def _names(tps: set) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)]
