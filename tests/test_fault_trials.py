"""kill -9 at the scale of issue 12: one of two group workers killed at a named fault point of the
commit protocol (local journal, object-store puts, the DLQ send, the control poll, a rebalance) or
at a random moment, restarted; nothing lost, nothing written twice, every offset settled once,
every bad record dead-lettered (tests/helpers/fault_trials.py; figures: bench/bench_fault_trials.py).
The trials are slow (30-70 s each: three worker start-ups); the fault-point facility itself is
checked always."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent / "helpers"))
from conftest import S3_BUCKET
from fault_trials import Trial, plan, run_trial

BUCKET = S3_BUCKET  # the session's moto server (tests/conftest.py, fixture ``s3_server``)


def check(result) -> None:
    assert not result.error, f"{result.trial.label}: {result.error} (logs: {result.logs})"
    assert result.fired, f"{result.trial.label}: the victim never reached its fault point (logs: {result.logs})"
    assert not result.hung, f"{result.trial.label}: settled, but a worker did not exit: {result.hung}"
    assert result.lost == 0 and result.duplicated == 0, result.to_dict()
    assert result.overlaps == 0 and result.settled == result.records, result.to_dict()
    assert result.dlq_missing == 0 and result.readable, result.to_dict()
    assert result.ok, result.to_dict()  # exact copies are dropped across batches and workers, s3 roots too


@pytest.mark.slow  # ~70 s on the shared 2-core machine (three worker start-ups): over the fast-suite budget
def test_kill_at_journal_append_of_one_of_two_workers(broker, tmp_path):
    """The shortest trial: a local root, one worker killed right after its first journal append
    (the commit), before it folds or notifies."""
    check(run_trial(Trial(seed=7, root_kind="local", point="local.after_journal", nth=1, n_docs=24),
                    bootstrap=broker.bootstrap, workdir=tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("trial", plan(50, seed=1), ids=lambda t: t.label)
def test_kill9_trials(broker, tmp_path, s3_server, trial):
    check(run_trial(trial, bootstrap=broker.bootstrap, workdir=tmp_path, bucket=BUCKET))


def test_a_fault_point_kills_only_at_its_hit(tmp_path):
    """``name@N`` passes the first N-1 hits and SIGKILLs the process at the N-th; other names and
    an unset variable are no-ops."""
    code = ("import sys\nfrom streams.faultpoints import reach\n"
            "for i in range(3):\n    reach('other'); reach('p'); print(i, flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for spec, rc, printed in (("p@2", -9, "0\n"), ("p", -9, ""), ("p@9", 0, "0\n1\n2\n"), ("", 0, "0\n1\n2\n")):
        proc = subprocess.run([sys.executable, "-c", code], env=dict(env, HEADWATER_KILL_AT=spec),
                              capture_output=True, text=True, timeout=60, check=False)
        assert (proc.returncode, proc.stdout) == (rc, printed), (spec, proc.stderr)
        assert ("faultpoint p@" in proc.stderr) == (rc == -9)
