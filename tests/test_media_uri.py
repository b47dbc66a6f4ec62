"""Media URI allow-list and payload reading."""

import base64

import pytest

from beam_jobs.media.errors import MediaRejected
from beam_jobs.media.uri import UriPolicy, check_uri, read_payload
from streams.events import RawRecord


def _rec(**kw) -> RawRecord:
    return RawRecord(id="r1", modality="image", source="test", license="cc0", **kw)


@pytest.fixture
def policy(tmp_path):
    return UriPolicy(allowed_schemes=("file", "gs"), allowed_prefixes=(f"file://{tmp_path}/media/", "gs://ok-bucket/raw/"))


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd", "/etc/passwd", "gs://other-bucket/raw/x.png", "gs://ok-bucket/rawx/y.png",
    "s3://ok-bucket/raw/x.png", "http://example.com/x.png", "file://remotehost/etc/passwd", "",
    "gs://ok-bucket/raw/../secret/x.png", "gs://ok-bucket/raw/x.png?token=1",
])
def test_disallowed_uris_rejected(uri, policy):
    with pytest.raises(MediaRejected) as e:
        check_uri(uri, policy)
    assert e.value.reason == "uri_not_allowed"


def test_traversal_out_of_allowed_prefix_rejected(tmp_path, policy):
    with pytest.raises(MediaRejected, match="no allowed prefix"):
        check_uri(f"file://{tmp_path}/media/../../../etc/passwd", policy)


def test_allowed_file_read_via_beam_filesystems(tmp_path, policy):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.bin").write_bytes(b"\x89PNGdata")
    assert read_payload(_rec(uri=f"file://{tmp_path}/media/a.bin"), policy) == b"\x89PNGdata"
    assert check_uri("gs://ok-bucket/raw/a/b.png", policy) == "gs://ok-bucket/raw/a/b.png"


def test_missing_empty_and_oversize_payloads(tmp_path, policy):
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "empty.bin").write_bytes(b"")
    cases = {
        "uri_unreadable": _rec(uri=f"file://{tmp_path}/media/missing.bin"),
        "empty": _rec(uri=f"file://{tmp_path}/media/empty.bin"),
        "too_large": _rec(data_b64=base64.b64encode(b"x" * 11).decode()),
    }
    small = UriPolicy(allowed_schemes=policy.allowed_schemes, allowed_prefixes=policy.allowed_prefixes, max_bytes=10)
    for reason, rec in cases.items():
        with pytest.raises(MediaRejected) as e:
            read_payload(rec, small)
        assert e.value.reason == reason


def test_default_policy_allows_no_uri():
    with pytest.raises(MediaRejected, match="no allowed prefix"):
        check_uri("file:///tmp/x.png", UriPolicy())
