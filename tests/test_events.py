"""Event contracts: JSON round-trips, arrow schemas, and clear errors naming the field."""

import json

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.events import (
    EVENT_TYPES,
    Alert,
    CheckpointSaved,
    Control,
    DeadLetter,
    EvalReport,
    EventError,
    MetricsEvent,
    OffsetRange,
    RawRecord,
    ShardPublished,
    TokenizedSample,
    arrow_schema,
    decode_event,
)

SAMPLES = [
    RawRecord(id="r1", modality="text", source="web", license="cc-by", text="héllo"),
    RawRecord(id="r2", modality="image", source="s", license="l", uri="file:///data/x.png", meta={"alt": "a cat"}),
    DeadLetter.of(b"\xff\x00junk", reason="invalid_utf8", stage="validate", topic="raw.text", partition=0, offset=7),
    TokenizedSample(id="r1", domain="web.en", modality="text", tokens=[1, 2, 3], source="web", license="cc", pipeline_version="p1"),
    ShardPublished(stream_root="/s", shard="shard.a.mds.zstd", domain="web.en", samples=3, bytes=10, vocab_version="v1", writer_id="w",
                   settled=[OffsetRange(topic="raw.text", partition=0, start=0, end=5)]),
    CheckpointSaved(run_id="run", path="/ck/step-10", step=10, tokens=1000, vocab_version="v1", data_cursor={"shards": 2}),
    EvalReport(run_id="run", step=10, checkpoint_path="/ck/step-10", suite="heldout", vocab_version="v1", metrics={"ppl": 12.5}),
    Alert(rule="dup_rate_spike", severity="critical", message="dups", source="ingest", evidence={"rate": 0.9}),
    Control(command="rollback", args={"to": "last_good"}, reason="eval regression"),
    MetricsEvent(component="ingest", values={"dup_rate": 0.1}, step=3),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.KIND)
def test_round_trip_and_generic_decode(event):
    wire = event.to_bytes()
    assert type(event).from_json(wire) == event
    assert decode_event(wire) == event
    assert json.loads(wire)["schema_version"] == (2 if isinstance(event, Control) else 1)


def test_unsigned_v1_control_is_rejected_clearly():
    obj = Control(command="pause_domain", args={"domain": "d"}).to_dict() | {"schema_version": 1}
    for name in ("key_id", "signature"):
        del obj[name]
    with pytest.raises(EventError, match=r"Control.schema_version: unsupported version 1"):
        decode_event(json.dumps(obj))


def test_every_event_kind_has_an_arrow_schema():
    for cls in EVENT_TYPES.values():
        schema = arrow_schema(cls)
        assert schema.metadata[b"kind"] == cls.KIND.encode()
    assert arrow_schema(TokenizedSample).field("tokens").type == pa.list_(pa.int32())
    assert arrow_schema(ShardPublished).field("settled").type.value_type.num_fields == 4


def test_unknown_version_is_rejected_clearly():
    obj = SAMPLES[3].to_dict() | {"schema_version": 99}
    with pytest.raises(EventError, match=r"TokenizedSample.schema_version: unsupported version 99"):
        decode_event(json.dumps(obj))


@pytest.mark.parametrize(
    "obj, where",
    [
        ({"id": "a", "modality": "text", "source": "s", "license": "l"}, "RawRecord.payload"),
        ({"id": "a", "modality": "text", "source": "s", "license": "l", "text": "x", "uri": "file:///x"}, "RawRecord.payload"),
        ({"id": "a", "modality": "smell", "source": "s", "license": "l", "text": "x"}, "RawRecord.modality"),
        ({"id": 5, "modality": "text", "source": "s", "license": "l", "text": "x"}, "RawRecord.id"),
        ({"modality": "text", "source": "s", "license": "l", "text": "x"}, "RawRecord.id"),
        ({"id": "a", "modality": "text", "source": "s", "license": "l", "text": "x", "colour": 1}, "RawRecord.colour"),
        ({"id": "a", "modality": "text", "source": "s", "license": "l", "text": "x", "meta": []}, "RawRecord.meta"),
    ],
)
def test_malformed_raw_records_name_the_field(obj, where):
    with pytest.raises(EventError) as e:
        RawRecord.from_json(json.dumps(obj))
    assert str(e.value).startswith(where)


def test_nested_and_root_errors():
    bad = SAMPLES[4].to_dict()
    bad["settled"][0]["start"] = "zero"
    with pytest.raises(EventError, match=r"ShardPublished.settled\[0\].start: expected an integer"):
        decode_event(bad)
    with pytest.raises(EventError, match="not valid JSON"):
        decode_event(b"{nope")
    with pytest.raises(EventError, match="unknown event kind"):
        decode_event({"kind": "Nope"})
    with pytest.raises(EventError, match="Control.command"):
        Control(command="format_disk")
    with pytest.raises(EventError, match="RawRecord.data_b64: invalid base64"):
        RawRecord(id="x", modality="audio", source="s", license="l", data_b64="%%%").payload_bytes()


@given(st.text(), st.dictionaries(st.text(min_size=1), st.floats(allow_nan=False, allow_infinity=False)))
def test_text_and_metric_values_survive_the_wire(text, values):
    rec = RawRecord(id="h", modality="text", source="s", license="l", text=text)
    assert RawRecord.from_json(rec.to_json()).text == text
    m = MetricsEvent(component="c", values=values)
    assert MetricsEvent.from_json(m.to_bytes()).values == values
