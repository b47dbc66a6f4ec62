"""Beam's cross-language ReadFromKafka (Dataflow/Flink) gets the same SASL/TLS connection as the
Python clients: Java properties built at launch from HEADWATER_KAFKA_* and the mounted files."""

from __future__ import annotations

from beam_jobs.sources.kafka import KafkaSourceConfig, xlang_consumer_config
from streams.kafka import KafkaSettings

PEM_CA = "-----BEGIN CERTIFICATE-----\nMIIBca\n-----END CERTIFICATE-----\n"


def test_sasl_ssl_settings_become_java_consumer_properties(tmp_path, monkeypatch):
    password = tmp_path / "password"
    password.write_text('pa"ss\\word\n')  # a quote and a backslash survive JAAS quoting
    ca = tmp_path / "ca.crt"
    ca.write_text(PEM_CA)
    for k, v in {"SECURITY_PROTOCOL": "SASL_SSL", "SASL_MECHANISM": "SCRAM-SHA-512",
                 "SASL_USERNAME": "headwater-ingest", "SASL_PASSWORD_FILE": str(password),
                 "SSL_CAFILE": str(ca)}.items():
        monkeypatch.setenv(f"HEADWATER_KAFKA_{k}", v)
    source = KafkaSourceConfig(bootstrap="kafka:9093", topics=["raw.text"], group="headwater-ingest")
    props = xlang_consumer_config(source, KafkaSettings.load(bootstrap=source.bootstrap))
    assert props["bootstrap.servers"] == "kafka:9093" and props["group.id"] == "headwater-ingest"
    assert props["security.protocol"] == "SASL_SSL" and props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["sasl.jaas.config"] == ('org.apache.kafka.common.security.scram.ScramLoginModule required '
                                         'username="headwater-ingest" password="pa\\"ss\\\\word";')
    assert props["ssl.truststore.type"] == "PEM" and props["ssl.truststore.certificates"] == PEM_CA
    assert props["enable.auto.commit"] == "false" and props["auto.offset.reset"] == "earliest"
    assert all(isinstance(v, str) for v in props.values())  # Java properties: strings only


def test_plain_mechanism_and_plaintext(tmp_path):
    password = tmp_path / "pw"
    password.write_text("secret")
    plain = KafkaSettings(bootstrap="b:9092", security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                          sasl_username="u", sasl_password_file=str(password))
    props = plain.java_client_config()
    assert props["sasl.jaas.config"].startswith("org.apache.kafka.common.security.plain.PlainLoginModule required")
    assert "ssl.truststore.type" not in props
    bare = KafkaSettings(bootstrap="b:9092").java_client_config()
    assert bare == {"bootstrap.servers": "b:9092", "security.protocol": "PLAINTEXT", "client.id": "headwater"}
