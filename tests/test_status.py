"""`headwater status`: run-directory view, one frame (--once), and real Kafka lag on a tansu broker."""

from __future__ import annotations

import pytest
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from infra.cli import main as cli_main
from infra.run_dir import RunDir
from infra.sample_run import write_sample_run
from infra.status import read_kafka, read_run
from streams.events import MetricsEvent
from streams.kafka import KafkaSettings, make_consumer, make_producer


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_run(tmp_path_factory.mktemp("run"), steps=40)


def test_run_view_rates_trainer_and_alerts(sample):
    last_alert = max(a.created_at for a in RunDir(sample).alerts())
    view = read_run(RunDir(sample), now=last_alert + 10, alert_window_s=30)
    assert next(iter(view.stage_totals)) == "decode"  # funnel order, not file order
    # sample snapshots are 10 s apart and add 200 records each to decode's input
    assert view.stage_rates["decode"] == pytest.approx(19.6, rel=0.01)
    assert view.drops["dedup/near_dup"] > 0
    assert view.shards == 20
    assert view.trainer["step"] == 34  # rolled back from 26 to 20, then 14 more steps
    assert set(view.trainer["weights"]) == {"text", "audio", "image", "video"}
    assert [a.created_at for a in view.open_alerts] == [last_alert]  # the older one left the window
    assert view.rollbacks == 1 and view.last_eval is not None and not view.last_eval.passed


def test_once_without_broker_renders_every_panel(sample, capsys):
    assert cli_main(["status", "--run-dir", str(sample), "--once", "--width", "140"]) == 0
    out = capsys.readouterr().out
    for text in ("Kafka", "no broker given", "Ingest", "decode", "shards published: 20", "Trainer",
                 "tokens/s", "data stall", "freshness", "Evals and alerts", "FAIL"):
        assert text in out, text


def test_once_on_an_empty_run_dir_says_no_data(tmp_path, capsys):
    assert cli_main(["status", "--run-dir", str(tmp_path), "--once", "--width", "120"]) == 0
    out = capsys.readouterr().out
    assert out.count("no data") == 3 and "open alerts: none" in out


def test_unreachable_broker_is_shown_not_raised():
    view = read_kafka(KafkaSettings(bootstrap="127.0.0.1:1"), timeout_ms=1500)
    assert "cannot reach Kafka at 127.0.0.1:1" in view.error


def test_lag_against_a_real_broker(broker, tmp_path, capsys):
    settings = broker.settings
    producer = make_producer(settings)
    for i in range(7):  # one record per request: tansu reports batch-level end offsets otherwise
        event = MetricsEvent(component="status-test", values={"i": i})  # valid: other tests read the topic
        producer.send("metrics.trainer", value=event.to_bytes(), partition=0).get(timeout=30)
    producer.close()
    before = read_kafka(settings).end_offsets["metrics.trainer"]
    consumer = make_consumer(settings, assign=[TopicPartition("metrics.trainer", 0)], group_id="status-test")
    consumer.commit({TopicPartition("metrics.trainer", 0): OffsetAndMetadata(before - 4, "", -1)})
    consumer.close()

    view = read_kafka(settings)
    assert not view.error
    assert set(view.end_offsets) >= {"raw.text", "shards", "evals", "control"}
    assert view.lag[("status-test", "metrics.trainer")] == 4

    (tmp_path / "broker.port").write_text(str(broker.port))  # discovered from the run dir
    assert cli_main(["status", "--run-dir", str(tmp_path), "--once", "--width", "160"]) == 0
    out = capsys.readouterr().out
    assert f"Kafka {broker.bootstrap}" in out and "status-test" in out
    row = next(line for line in out.splitlines() if "status-test" in line)
    assert row.split("│")[1].split()[-1] == "4"
