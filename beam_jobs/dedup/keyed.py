"""Keyed-state steps shared by the sharded dedup chains (text :mod:`beam_jobs.dedup.transform`,
images :mod:`beam_jobs.media.dedup_transform`).

Plain functions over Beam state and timer handles: each chain keeps its own DoFn classes and
its own state/timer names (shared class or timer names across chains in one pipeline mis-route
keys on the FnApiRunner), and calls these for the logic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.utils.timestamp import Timestamp

__all__ = ["admit", "hold_probe", "register_or_answer", "take_due"]


def hold_probe(probe: Any, pending: Any, nxt: Any, wake: Any) -> None:
    """Buffer ``probe`` (has ``prio``, event time in micros) and move the watermark timer
    ``wake`` earlier when it is due before the one set (``nxt`` holds that due time)."""
    pending.add(probe)
    due = nxt.read()
    if due is None or probe.prio < due:
        nxt.write(probe.prio)
        wake.set(Timestamp(micros=probe.prio))


def take_due(fired_micros: int, pending: Any, nxt: Any, wake: Any) -> list:
    """The buffered probes due at ``fired_micros``, in priority order ``(prio, order)``; the rest
    stay buffered with the timer re-set for the earliest of them."""
    probes = list(pending.read())
    ready = sorted((p for p in probes if p.prio <= fired_micros), key=lambda p: (p.prio, p.order))
    rest = [p for p in probes if p.prio > fired_micros]
    pending.clear()
    nxt.clear()
    for p in rest:
        pending.add(p)
    if rest:
        due = min(p.prio for p in rest)
        nxt.write(due)
        wake.set(Timestamp(micros=due))
    return ready


def admit(ids: list[int], idh: int, cap: int, namespace: str) -> None:
    """Append ``idh`` to a bucket's ``ids``, evicting (and counting) the oldest beyond ``cap``."""
    ids.append(idh)
    if len(ids) > cap:
        Metrics.counter(namespace, "bucket_evicted").inc(len(ids) - cap)
        del ids[: len(ids) - cap]


def register_or_answer(kind: str, payload: Any, state: Any, waiting: Any,
                       answer: Callable[[Any, Any], tuple]) -> Iterator[tuple]:
    """One Verify message: a registration (``kind == "reg"``) is held in ``state`` (the first
    one stands) and answers the queries ``waiting`` for it; a query is answered against the
    held registration, or waits for it."""
    held = state.read()
    if kind == "reg":
        if held is not None:  # the same id again (a replay): the first registration stands
            return
        state.write(payload)
        for q in waiting.read():
            yield answer(payload, q)
        waiting.clear()
    elif held is None:
        waiting.add(payload)
    else:
        yield answer(held, payload)
