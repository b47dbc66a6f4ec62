"""Listener of the ``control`` topic: the commands the trainer obeys (see docs/TEAM_CONTRACTS.md).

    rollback           {"target": "last_good"|"step", "run_id", "step"?, "checkpoint"?, "quarantine"?}
    quarantine_shards  {"shards": [...], "run_id"?}
    quarantine_source  {"source"}      every sample whose ``source`` column matches is skipped
    pause_domain       {"domain"}      / resume_domain {"domain"}

A command whose ``args.run_id`` names another run is ignored. Rank 0 consumes the topic
in a background thread (from its end at start-up, so old commands are not replayed); each
step the trainer drains the queue on rank 0 and broadcasts the commands so every rank
applies them at the same step.
"""

from __future__ import annotations

import logging
import queue
import threading

from streams.events import Control, EventError, decode_event

__all__ = ["TRAINER_COMMANDS", "ControlListener", "addressed_to"]

log = logging.getLogger(__name__)

TRAINER_COMMANDS = ("rollback", "pause_domain", "resume_domain", "quarantine_shards", "quarantine_source")


def addressed_to(event: Control, run_id: str) -> bool:
    """True if ``event`` is a trainer command for ``run_id`` (or for every run)."""
    target = event.args.get("run_id")
    return event.command in TRAINER_COMMANDS and not (target and run_id and target != run_id)


class ControlListener:
    """Background consumer of Control events addressed to this trainer run."""

    def __init__(self, bootstrap: str, *, run_id: str = ""):
        from kafka import TopicPartition

        from streams.kafka import KafkaSettings, make_consumer

        self.run_id = run_id
        self.queue: queue.Queue[Control] = queue.Queue()
        tp = TopicPartition("control", 0)
        settings = KafkaSettings.load(bootstrap=bootstrap, client_id="headwater-trainer-control")
        self.consumer = make_consumer(settings, assign=[tp])
        self.consumer.seek_to_end(tp)
        self.consumer.position(tp)  # resolve the end offset now, before any new command
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for batch in self.consumer.poll(timeout_ms=200).values():
                for record in batch:
                    try:
                        event = decode_event(record.value)
                    except EventError as e:
                        log.warning("ignoring bad control record at offset %s: %s", record.offset, e)
                        continue
                    if isinstance(event, Control) and addressed_to(event, self.run_id):
                        self.queue.put(event)

    def drain(self) -> list[Control]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()
