"""Listener of the ``control`` topic: rollback, pause/resume domain, quarantine shards.

Rank 0 consumes the topic in a background thread (from its end at start-up, so old
commands are not replayed); each step the trainer drains the queue on rank 0 and
broadcasts the commands so every rank applies them at the same step.
"""

from __future__ import annotations

import logging
import queue
import threading

from streams.events import Control, EventError, decode_event

__all__ = ["TRAINER_COMMANDS", "ControlListener"]

log = logging.getLogger(__name__)

TRAINER_COMMANDS = ("rollback", "pause_domain", "resume_domain", "quarantine_shards")


class ControlListener:
    """Background consumer of Control events addressed to the trainer."""

    def __init__(self, bootstrap: str, *, run_id: str = ""):
        from kafka import TopicPartition

        from streams.kafka import KafkaSettings, make_consumer

        self.run_id = run_id
        self.queue: queue.Queue[Control] = queue.Queue()
        tp = TopicPartition("control", 0)
        self.consumer = make_consumer(KafkaSettings(bootstrap=bootstrap, client_id="headwater-trainer-control"), assign=[tp])
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
                    if not isinstance(event, Control) or event.command not in TRAINER_COMMANDS:
                        continue
                    target = event.args.get("run_id")
                    if target and self.run_id and target != self.run_id:
                        continue
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
