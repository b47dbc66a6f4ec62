"""Alert quality of eval-regression rollbacks, measured on the real detector, rules and policy.

A synthetic eval suite (15 text domains x 24 items) is scored at every checkpoint of a
synthetic training run: each item's log-perplexity decays towards its floor (``improving``), or
sits at it from the start (``plateau``: a run past its learning phase), plus checkpoint noise
per item and a slow per-domain drift (what online mixing does to a domain it down-weights).
Every checkpoint goes through what the services do with it: ``assess`` (the evaluator's own
call: baseline, bootstrap, Holm; evaluators/regression.py) over every report of the run,
abandoned branches included, the rules engine on the report's metrics
(infra/alerts/rules.toml), the regression Alert routed by that file's ``[actions]``
(evaluators/alerts/routing.py) and the :class:`RollbackPolicy`, fed the checkpoints and
reports, and told when the simulated trainer applied a rollback. One simulated clock drives
checkpoint save times, the policy and the Controls it issues, so the policy's view of
rolled-back branches is the production one.

1. clean runs: N checkpoints, no poison, improving and plateau -> rollbacks issued (false alarms);
2. poisoned runs, improving and plateau: from a random checkpoint one domain's log-perplexity
   rises by ``--poison`` (and stays up while it trains on the poison) -> checkpoints until the
   rollback is issued;
3. recurring poison: after the rollback the same domain regresses again against the same
   good checkpoint -> rollbacks issued (the circuit breaker must pause the domain instead);
4. latency on a real broker: regression Alert published -> signed rollback Control on
   ``control`` (sentinel) -> the trainer's ControlListener has verified it.

    .venv/bin/python bench/bench_alert_quality.py [--checkpoints 120] [--seeds 5] [--latency-repeats 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from evaluators.alerts.routing import Router
from evaluators.alerts.rules import AlertEngine, parse_rules
from evaluators.regression import RegressionConfig, assess, regression_alert
from evaluators.rollback import CIRCUIT_RULE, RollbackPolicy
from streams.events import Alert, CheckpointSaved, Control, EvalReport, decode_event

DOMAINS = [f"{src}_{lang}" for src in ("wiki", "news", "forum") for lang in ("en", "de", "fr", "es", "it")]
RULES = ROOT / "infra" / "alerts" / "rules.toml"
PLATEAU = 250
"""checkpoints of decay already behind a ``plateau`` run (exp(-250/25): at its floor)"""


class SyntheticRun:
    """Per-item log-perplexity of a training run's checkpoints on a fixed eval suite."""

    def __init__(self, seed: int, *, items_per_domain: int = 24, item_noise: float = 0.03,
                 drift_sd: float = 0.008, plateau: bool = False):
        self.rng = np.random.default_rng(seed)
        n = len(DOMAINS) * items_per_domain
        self.domains = [d for d in DOMAINS for _ in range(items_per_domain)]
        self.tokens = self.rng.integers(40, 200, n)
        self.floor = self.rng.uniform(2.0, 3.5, n)
        self.gap = self.rng.uniform(2.0, 4.0, n)
        self.item_noise, self.drift_sd = item_noise, drift_sd
        self.drift = np.zeros(len(DOMAINS))
        self.offset = PLATEAU if plateau else 0

    def score(self, k: int, poison: dict[str, float]) -> np.ndarray:
        """Per-item mean NLL at checkpoint ``k`` (``poison``: extra log-ppl per domain)."""
        # mixing: a mean-reverting per-domain offset (stationary sd = drift_sd / sqrt(1 - 0.9^2))
        self.drift = 0.9 * self.drift + self.rng.normal(0, self.drift_sd, len(DOMAINS))
        offset = np.repeat(self.drift, len(self.domains) // len(DOMAINS))
        extra = np.array([poison.get(d, 0.0) for d in self.domains])
        decay = np.exp(-(k + self.offset) / 25)
        return self.floor + self.gap * decay + offset + extra + self.rng.normal(0, self.item_noise, len(self.domains))


class Pipeline:
    """What evaluator, rules engine, router and rollback policy do with each checkpoint."""

    def __init__(self, run_id: str, cfg: RegressionConfig):
        doc = tomllib.loads(RULES.read_text())
        self.router = Router(doc, parse_rules(doc), control_hooks={"control"}, declared=set(doc["hooks"]))
        self.engine = AlertEngine(parse_rules(doc), source="bench")
        self.cfg, self.run_id = cfg, run_id
        self.reports: list[EvalReport] = []
        self.wall = 1.7e9  # the simulated clock: checkpoints a minute apart, the policy, its Controls
        self.policy = RollbackPolicy(issued_by="bench", clock=lambda: self.wall)
        self.rollbacks: list[Control] = []
        self.pauses: list[Control] = []
        self.pages: list[Alert] = []
        self.engine_actions = 0

    def checkpoint(self, step: int, nll_per_token: np.ndarray, run: SyntheticRun) -> Control | None:
        """Evaluate one checkpoint; the rollback Control issued for it, if any."""
        self.wall += 60.0
        path = f"/runs/{self.run_id}/checkpoints/step-{step}"
        self.policy.observe(CheckpointSaved(run_id=self.run_id, path=path, step=step, tokens=step,
                                            vocab_version="v", wall_time=self.wall))
        items = {"id": [f"i{i}" for i in range(len(run.domains))], "nll": (nll_per_token * run.tokens).tolist(),
                 "tokens": run.tokens.tolist(), "modality": ["text"] * len(run.domains), "domain": run.domains}
        report = EvalReport(run_id=self.run_id, step=step, checkpoint_path=path, suite="heldout", vocab_version="v",
                            metrics={"text/ppl": float(np.exp(nll_per_token.mean()))},
                            details={"items": items, "suite_version": "s1", "checkpoint_wall_time": self.wall})
        assess(report, self.reports, self.cfg)
        self.reports.append(report)
        self.policy.observe(report)
        for alert in self.engine.observe_eval(report):
            self.engine_actions += self.router.for_raised(alert).action != "none"
        if report.passed:
            return None
        alert = regression_alert(report, source="bench")
        decision = self.policy.decide(alert, self.router.for_external(alert).action)
        for control in decision.controls:
            self.policy.observe(control)
        self.pauses += [c for c in decision.controls if c.command == "pause_domain"]
        self.pages += [a for a in decision.alerts if a.rule == CIRCUIT_RULE]
        rollback = next((c for c in decision.controls if c.command == "rollback"), None)
        if rollback is not None:
            self.rollbacks.append(rollback)
            self.wall += 1.0  # the trainer applies it
            self.policy.observe(Alert(rule="trainer.rollback", severity="warning", source="trainer",
                                      message="applied", created_at=self.wall,
                                      evidence={"run_id": self.run_id, "to_step": rollback.args["step"],
                                                "control_id": rollback.control_id}))
        return rollback


def clean_run(seed: int, n: int, cfg: RegressionConfig, drift_sd: float = 0.008, *, plateau: bool = False) -> int:
    """Rollbacks and rule actions in ``n`` clean checkpoints (all false alarms)."""
    run, pipe = SyntheticRun(seed, drift_sd=drift_sd, plateau=plateau), Pipeline(f"clean-{seed}", cfg)
    for k in range(1, n + 1):
        pipe.checkpoint(10 * k, run.score(k, {}), run)
    return len(pipe.rollbacks) + pipe.engine_actions


def poisoned_run(seed: int, n: int, cfg: RegressionConfig, poison: float, *,
                 plateau: bool = False) -> tuple[int | None, str]:
    """Checkpoints from the first poisoned one to the rollback (1 = caught at the first; 0 = a false
    alarm came first; None = never caught), and the domain."""
    run, pipe = SyntheticRun(seed, plateau=plateau), Pipeline(f"poison-{seed}", cfg)
    rng = np.random.default_rng(10_000 + seed)
    start, domain = int(rng.integers(10, n - 5)), DOMAINS[int(rng.integers(len(DOMAINS)))]
    for k in range(1, n + 1):
        rollback = pipe.checkpoint(10 * k, run.score(k, {domain: poison} if k >= start else {}), run)
        if rollback is not None:
            return (k - start + 1 if k >= start else 0), domain
    return None, domain


def recurring_run(seed: int, cfg: RegressionConfig, poison: float) -> tuple[int, int, int]:
    """The poison comes back after the rollback (its source keeps sending it): the model restarts
    from the rolled-back step and regresses the same way. Returns (rollbacks, pauses, pages)."""
    run, pipe = SyntheticRun(seed), Pipeline(f"recur-{seed}", cfg)
    k = 0
    for _ in range(40):
        k += 1
        rollback = pipe.checkpoint(10 * k, run.score(k, {"forum_en": poison} if k >= 20 else {}), run)
        if rollback is not None:
            k = rollback.args["step"] // 10  # the trainer continues from the restored checkpoint
    return len(pipe.rollbacks), len(pipe.pauses), len(pipe.pages)


def latency(repeats: int) -> tuple[list[float], list[float]]:
    """Regression Alert published -> rollback Control on ``control`` -> verified by the trainer's listener."""
    from streams.broker import EmbeddedBroker
    from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
    from streams.signing import ControlVerifier, write_dev_keys

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(write_dev_keys(tmp))
        from evaluators.sentinel import Sentinel
        from trainer.control import ControlListener

        broker = EmbeddedBroker(run_dir=Path(tmp) / "broker", port=0)
        broker.start()
        try:
            settings = KafkaSettings(bootstrap=broker.bootstrap)
            rules = Path(tmp) / "rules.toml"
            rules.write_text('[dispatch]\ndefault_hooks = ["control"]\n[hooks.control]\ntype = "control"\n'
                             '[actions]\neval_regression = ["rollback"]\n')
            sentinel = Sentinel(Sentinel.Config(bootstrap=broker.bootstrap, rules=str(rules),
                                                lineage=str(Path(tmp) / "lineage.jsonl")))
            stop = threading.Event()
            th = threading.Thread(target=sentinel.run, kwargs={"stop": stop}, daemon=True)
            th.start()
            listener = ControlListener(broker.bootstrap, verifier=ControlVerifier.from_env(), run_id="bench")
            from kafka import TopicPartition
            tp = TopicPartition("control", 0)
            control = make_consumer(settings, assign=[tp])
            control.seek_to_end(tp)
            control.position(tp)
            producer = make_producer(settings)
            wall = time.time() - 3600
            publish(producer, "checkpoints", CheckpointSaved(run_id="bench", path="/b/step-10", step=10, tokens=1,
                                                             vocab_version="v", wall_time=wall))
            publish(producer, "evals", EvalReport(run_id="bench", step=10, checkpoint_path="/b/step-10", suite="s",
                                                  vocab_version="v", details={"checkpoint_wall_time": wall}))
            time.sleep(5)  # the sentinel joins its group
            to_topic, to_trainer = [], []
            for i in range(repeats):
                saved_at = time.time()
                path = f"/b/step-{20 + i}"
                publish(producer, "checkpoints", CheckpointSaved(run_id="bench", path=path, step=20 + i, tokens=1,
                                                                 vocab_version="v", wall_time=saved_at))
                findings = [{"metric": f"domain/{DOMAINS[i % len(DOMAINS)]}", "significant": True, "delta": 0.2,
                             "ci_low": 0.1, "ci_high": 0.3, "p_value": 0.001}]
                report = EvalReport(run_id="bench", step=20 + i, checkpoint_path=path, suite="s", vocab_version="v",
                                    passed=False, details={"checkpoint_wall_time": saved_at, "regression": {
                                        "best_checkpoint": "/b/step-10", "best_step": 10, "findings": findings}})
                publish(producer, "evals", report)
                t0 = time.monotonic()
                publish(producer, "alerts", regression_alert(report, source="bench"))
                got_topic = got_trainer = rollback_id = None
                deadline = t0 + 60
                while (got_topic is None or got_trainer is None) and time.monotonic() < deadline:
                    for batch in control.poll(timeout_ms=20).values():
                        for record in batch:
                            event = decode_event(record.value)
                            if got_topic is None and isinstance(event, Control) and event.command == "rollback":
                                got_topic, rollback_id = time.monotonic(), event.control_id
                    if got_trainer is None and listener.drain():
                        got_trainer = time.monotonic()
                if got_topic is None or got_trainer is None:
                    raise RuntimeError(f"repeat {i}: no rollback Control within 60 s")
                to_topic.append(got_topic - t0)
                to_trainer.append(got_trainer - t0)
                publish(producer, "alerts", Alert(rule="trainer.rollback", severity="warning", source="trainer",
                                                  message="applied", evidence={"run_id": "bench", "to_step": 10,
                                                                               "control_id": rollback_id}))
                time.sleep(0.5)
            stop.set()
            th.join(timeout=30)
            sentinel.close()
            listener.close()
            control.close()
            producer.close()
        finally:
            broker.stop()
    return to_topic, to_trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", type=int, default=120, help="checkpoints per clean run")
    p.add_argument("--seeds", type=int, default=5, help="clean runs (seeds 0..N-1)")
    p.add_argument("--poisoned", type=int, default=20, help="poisoned runs")
    p.add_argument("--poison", type=float, default=0.15, help="log-ppl increase of the poisoned domain")
    p.add_argument("--latency-repeats", type=int, default=10)
    args = p.parse_args(argv)
    cfg = RegressionConfig()
    print(f"detector: latest passed baseline, Holm over {len(DOMAINS) + 2} metrics per checkpoint, "
          f"alpha={cfg.alpha}, min effect +{cfg.min_rel_increase:.0%} perplexity, n_boot={cfg.n_boot}, "
          f"checkpoint variance + trend from the last {cfg.history} passed reports")
    t0 = time.perf_counter()
    false_alarms = checked = 0
    for plateau in (False, True):
        phase = "plateau" if plateau else "improving"
        for drift in (0.008, 0.012):
            alarms = [clean_run(s, args.checkpoints, cfg, drift, plateau=plateau) for s in range(args.seeds)]
            false_alarms, checked = false_alarms + sum(alarms), checked + args.seeds * args.checkpoints
            print(f"clean {phase}, mixing drift sd {drift / np.sqrt(0.19):.1%} per domain: {args.seeds} runs x "
                  f"{args.checkpoints} checkpoints -> {sum(alarms)} rollbacks/actions (per run {alarms})")
        delays = [poisoned_run(s, 60, cfg, args.poison, plateau=plateau)[0] for s in range(args.poisoned)]
        caught = sorted(d for d in delays if d)
        false_alarms += delays.count(0)
        print(f"poisoned {phase} (+{args.poison} log-ppl = +{np.expm1(args.poison):.0%} ppl on one of 15 domains): "
              f"{len(caught)}/{args.poisoned} caught, {sum(d <= 2 for d in caught)} within 2 checkpoints; "
              f"delays {caught}; false alarm first {delays.count(0)}; never caught {delays.count(None)}")
    print(f"false alarms, all scenarios: {false_alarms} ({checked} clean checkpoints + the clean stretches "
          f"of {2 * args.poisoned} poisoned runs)")
    recur = [recurring_run(s, cfg, args.poison) for s in range(5)]
    print(f"recurring poison (5 runs): (rollbacks, pauses, pages) per run {recur}")
    print(f"statistics part: {time.perf_counter() - t0:.1f} s")
    if args.latency_repeats:
        to_topic, to_trainer = latency(args.latency_repeats)
        print(f"alert -> rollback Control on `control`: median {statistics.median(to_topic) * 1000:.0f} ms, "
              f"max {max(to_topic) * 1000:.0f} ms; -> verified by the trainer's listener: median "
              f"{statistics.median(to_trainer) * 1000:.0f} ms, max {max(to_trainer) * 1000:.0f} ms "
              f"({args.latency_repeats} alerts, real embedded broker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
