"""Listener of the ``control`` topic: the commands the trainer obeys (see docs/TEAM_CONTRACTS.md).

    rollback           {"target": "last_good"|"step", "run_id", "step"?, "checkpoint"?, "quarantine"?}
    quarantine_shards  {"shards": [...], "run_id"}
    quarantine_source  {"source"}      every sample whose ``source`` column matches is skipped
    pause_domain       {"domain", "run_id"}  / resume_domain {"domain", "run_id"}

A command whose ``args.run_id`` names another run is ignored; the trainer-only commands
(``streams.signing.RUN_COMMANDS``) must name this run. Every command addressed here is verified
(``streams.signing.ControlVerifier``: signed by a keyring key allowed the command, fresh, not
replayed); a refused one is dropped and raises a critical ``control.rejected`` Alert on
``alerts`` (at most one per reason per cooldown). The ids of applied controls and the paused
domains survive a restart (trainer/control_state.py). Rank 0 consumes the topic
in a background thread. At start-up it begins at the first record written within the verifier's
freshness window (``offsets_for_times(now - window_s)``), so a command sent while the trainer
was down (a restart, a crash) is still obeyed; older commands would be refused as stale anyway,
and those it applied before the restart are refused as replays (their ids are restored from
RUN/control.json into the verifier). Stale and replayed commands met during that catch-up are
expected and dropped with a log line, not an alert. Each
step the trainer drains the queue on rank 0 and broadcasts the commands so every rank
applies them at the same step. Undecodable records are dead-lettered with an alert by a
:class:`ConsumerGuard`; if the thread dies anyway, :meth:`ControlListener.check` re-raises its
error so the trainer stops instead of training on, deaf to control.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from streams.events import Alert, Control, Event
from streams.guard import CONTROL_MAX_POLL_RECORDS, REDELIVER, ConsumerGuard
from streams.signing import ControlRejected, ControlVerifier, RejectionAlerts, brief

__all__ = ["TRAINER_COMMANDS", "ControlListener", "addressed_to"]

log = logging.getLogger(__name__)

TRAINER_COMMANDS = ("rollback", "pause_domain", "resume_domain", "quarantine_shards", "quarantine_source")


def addressed_to(event: Control, run_id: str) -> bool:
    """True if ``event`` is a trainer command for ``run_id`` (or names no run: verification then
    rejects a run-less trainer-only command)."""
    target = event.args.get("run_id")
    return event.command in TRAINER_COMMANDS and not (target and run_id and target != run_id)


class ControlListener:
    """Background consumer of Control events addressed to this trainer run."""

    def __init__(self, bootstrap: str, *, verifier: ControlVerifier, run_id: str = ""):
        from kafka import TopicPartition

        from streams.kafka import KafkaSettings, make_consumer, make_producer

        self.run_id, self.verifier = run_id, verifier
        self.alerts = RejectionAlerts("trainer")
        self.queue: queue.Queue[Control] = queue.Queue()
        tp = TopicPartition("control", 0)
        settings = KafkaSettings.load(bootstrap=bootstrap, client_id="headwater-trainer-control")
        self.consumer = make_consumer(settings, assign=[tp])
        self.producer = make_producer(settings)
        self.guard = ConsumerGuard("trainer-control", self.producer, max_bytes=Control.MAX_BYTES)
        self._pending: list[Alert] = []  # rejection alerts not yet acknowledged by the broker
        self.error: BaseException | None = None
        self.consumer.seek_to_end(tp)
        self.catch_up_end = self.consumer.position(tp)  # records before it were written before we started
        since = self.consumer.offsets_for_times({tp: int((time.time() - verifier.window_s) * 1000)}).get(tp)
        if since is not None:
            self.consumer.seek(tp, since.offset)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="control-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for tp, batch in self.consumer.poll(timeout_ms=200, max_records=CONTROL_MAX_POLL_RECORDS).items():
                    for record in batch:
                        catching_up = record.offset < self.catch_up_end
                        if self.guard.handle(record, lambda e, c=catching_up: self._enqueue(e, catching_up=c)) \
                                is REDELIVER:  # transient: retry it
                            self.consumer.seek(tp, record.offset)
                            self._stop.wait(self.guard.retry_delay_s())
                            break
                self.guard.flush()
        except BaseException as e:  # recorded for check(): the trainer stops on its next step
            self.error = e
            log.critical("control listener died: %s: %s", type(e).__name__, e, exc_info=True)

    def _enqueue(self, event: Event, *, catching_up: bool = False) -> None:
        if not (isinstance(event, Control) and addressed_to(event, self.run_id)):
            return
        try:
            self.verifier.verify(event)
        except ControlRejected as e:
            from streams.kafka import publish

            if catching_up and e.reason in ("stale", "replayed"):  # sent before the window / applied before
                log.info("control %s %s from before start-up skipped: %s", event.command, brief(event.control_id), e)
                return
            log.error("control %s %s rejected: %s", event.command, brief(event.control_id), e)
            alert = self.alerts(event, e, run_id=self.run_id)
            if alert is not None:  # pending until acknowledged: a redelivery's rejection is rate-limited
                self._pending.append(alert)
            while self._pending:
                publish(self.producer, "alerts", self._pending[0], key=self._pending[0].rule)
                self._pending.pop(0)
            return
        self.queue.put(event)

    def pending(self) -> bool:
        """True if commands wait or the thread died: the trainer's ranks then collect at the next
        step together (and, if it died, all stop there)."""
        return self.error is not None or not self.queue.empty()

    def check(self) -> None:
        """Raise if the listener thread died: a trainer must not run on deaf to control."""
        if self.error is not None:
            raise RuntimeError("the control listener thread died; control commands are no longer "
                               "received") from self.error

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
        self.producer.close()
