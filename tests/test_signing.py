"""Signed controls: keys, keyring permissions, and every way ControlVerifier refuses a control."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from streams.events import Control, decode_event
from streams.signing import (
    ControlRejected,
    ControlVerifier,
    Keyring,
    RejectionAlerts,
    SigningError,
    brief,
    canonical_control_bytes,
    generate_keypair,
    load_signing_key,
    rejection_alert,
    sign_bytes,
    sign_control,
    verify_bytes,
    write_dev_keys,
)

NOW = 1_800_000_000.0


@pytest.fixture()
def keys():
    return {role: generate_keypair(f"k-{role}", role) for role in ("operator", "sentinel", "trainer")}


@pytest.fixture()
def ring(keys):
    r = Keyring()
    for k in keys.values():
        r.add(k.key_id, k.public_key, k.role)
    return r


def verifier(ring, **kw):
    return ControlVerifier(ring, window_s=300, max_skew_s=30, clock=lambda: NOW, **kw)


def rollback(**kw):
    return Control(command="rollback", args={"target": "step", "run_id": "run-1", "step": 10}, reason="test",
                   issued_at=NOW, **kw)


def at(control: Control, t: float) -> Control:
    return dataclasses.replace(control, issued_at=t)


def rejected(v, control, **kw) -> str:
    with pytest.raises(ControlRejected) as e:
        v.verify(control, **kw)
    return e.value.reason


def test_signed_control_survives_the_wire_and_is_accepted_once(keys, ring):
    signed = sign_control(rollback(issued_by="anyone"), keys["operator"])
    assert signed.issued_by == signed.key_id == "k-operator" and signed.signature
    wire = decode_event(signed.to_bytes())
    v = verifier(ring)
    assert v.verify(wire).role == "operator"
    assert rejected(v, wire) == "replayed"


def test_forged_tampered_and_foreign_controls_are_rejected(keys, ring):
    v = verifier(ring)
    assert rejected(v, rollback()) == "unsigned"
    signed = sign_control(rollback(), keys["operator"])
    tampered = dataclasses.replace(signed, args={**signed.args, "step": 0})
    assert rejected(v, tampered) == "bad_signature"
    assert rejected(v, dataclasses.replace(signed, reason="other")) == "bad_signature"
    assert rejected(v, dataclasses.replace(signed, signature="A" * 88)) == "bad_signature"
    assert rejected(v, dataclasses.replace(signed, signature="%%not base64%%")) == "bad_signature"
    # signed by a key the keyring does not know, or claiming a known key id
    stranger = generate_keypair("k-operator", "operator")  # same id, other key
    assert rejected(v, sign_control(rollback(), stranger)) == "bad_signature"
    assert rejected(v, sign_control(rollback(), generate_keypair("nobody", "operator"))) == "unknown_key"
    # issued_by is bound to the key: re-labelling it breaks the signature
    assert rejected(v, dataclasses.replace(signed, issued_by="operator-alice")) == "bad_signature"


def test_issuer_must_be_the_key(keys, ring):
    c = dataclasses.replace(rollback(), key_id="k-operator", issued_by="someone-else")
    c = dataclasses.replace(c, signature=sign_bytes(keys["operator"], canonical_control_bytes(c)))
    assert rejected(verifier(ring), c) == "issuer_mismatch"


def test_role_permissions(keys, ring):
    v = verifier(ring)
    resume = Control(command="resume_source", args={"source": "s"}, issued_at=NOW)
    assert rejected(v, sign_control(resume, keys["sentinel"])) == "not_permitted"
    assert v.verify(sign_control(resume, keys["operator"])).role == "operator"
    assert v.verify(sign_control(rollback(), keys["sentinel"])).role == "sentinel"
    assert rejected(v, sign_control(rollback(), keys["trainer"])) == "not_permitted"
    # a keyring entry may narrow a role, never widen it
    narrow = Keyring()
    narrow.add("k-operator", keys["operator"].public_key, "operator", ["pause_source"])
    assert rejected(verifier(narrow), sign_control(rollback(), keys["operator"])) == "not_permitted"
    with pytest.raises(SigningError, match="may not issue"):
        Keyring().add("t", keys["trainer"].public_key, "trainer", ["rollback"])


def test_rollback_needs_a_run(keys, ring):
    v = verifier(ring)
    for args in ({"target": "last_good"}, {"target": "last_good", "run_id": ""}, {"run_id": 5}):
        c = sign_control(Control(command="rollback", args=args, issued_at=NOW), keys["operator"])
        assert rejected(v, c) == "no_run"


def test_trainer_only_commands_need_a_well_formed_run(keys, ring):
    v = verifier(ring)
    for command, args in (("pause_domain", {"domain": "d"}), ("resume_domain", {"domain": "d"}),
                          ("quarantine_shards", {"shards": ["a.mds"]})):
        assert rejected(v, sign_control(Control(command=command, args=args, issued_at=NOW), keys["operator"])) \
            == "no_run"
        for bad in ("run 1", "../x", "r\nx", "a" * 129, ["run-1"]):
            c = sign_control(Control(command=command, args={**args, "run_id": bad}, issued_at=NOW), keys["operator"])
            assert rejected(v, c) == "no_run"
        v.verify(sign_control(Control(command=command, args={**args, "run_id": "run-1a2b3c4d"}, issued_at=NOW),
                              keys["operator"]))
    # a source command needs no run, but one it names is checked too
    v.verify(sign_control(Control(command="pause_source", args={"source": "s"}, issued_at=NOW), keys["operator"]))
    assert rejected(v, sign_control(Control(command="pause_source", args={"source": "s", "run_id": "a b"},
                                            issued_at=NOW), keys["operator"])) == "no_run"


def test_clock_window(keys, ring):
    v = verifier(ring)
    assert rejected(v, at(sign_control(rollback(), keys["operator"]), NOW - 301)) == "bad_signature"
    assert rejected(v, sign_control(at(rollback(), NOW - 301), keys["operator"])) == "stale"
    assert rejected(v, sign_control(at(rollback(), NOW + 31), keys["operator"])) == "future"
    assert v.verify(sign_control(at(rollback(), NOW + 29), keys["operator"]))
    # catch-up (ingest replaying the log): no window, but still no future controls
    old = sign_control(at(rollback(), NOW - 86400), keys["operator"])
    assert v.verify(old, catch_up=True) and v.verify(old, catch_up=True)
    assert rejected(v, sign_control(at(rollback(), NOW + 31), keys["operator"]), catch_up=True) == "future"


def test_non_finite_time_is_rejected_even_when_decoded_from_the_wire(keys, ring):
    v = verifier(ring)
    for t in (float("nan"), float("inf"), float("-inf")):
        assert rejected(v, at(rollback(), t)) == "non_finite_time"
    obj = json.loads(sign_control(rollback(), keys["operator"]).to_json())
    text = json.dumps(obj).replace(str(obj["issued_at"]), "NaN")
    try:
        c = decode_event(text)
    except ValueError:  # the event codec itself refuses non-finite numbers: fine too
        return
    assert rejected(v, c) == "non_finite_time"


def test_seen_cache_is_bounded_by_the_window(keys, ring):
    now = [NOW]
    v = ControlVerifier(ring, window_s=60, clock=lambda: now[0])
    for i in range(50):
        now[0] = NOW + i * 10
        v.verify(sign_control(at(rollback(), now[0]), keys["operator"]))
    assert len(v.seen) <= 7


def test_keys_load_from_files_or_env_and_never_show(tmp_path, keys):
    secret = keys["operator"].export_secret()
    assert secret not in repr(keys["operator"]) and keys["operator"].public_key not in repr(keys["operator"])
    path = tmp_path / "op.key"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    from_file = load_signing_key("operator", env={"HEADWATER_OPERATOR_KEY_FILE": str(path)})
    from_env = load_signing_key("operator", env={"HEADWATER_OPERATOR_KEY": secret})
    assert from_file.public_key == from_env.public_key == keys["operator"].public_key
    with pytest.raises(SigningError, match="no operator key"):
        load_signing_key("operator", env={})
    assert load_signing_key("operator", env={}, required=False) is None
    seed = secret.split(":")[1]
    for bad in (seed[:-4], seed[:-1] + "%", "", "x" * 44):
        with pytest.raises(SigningError) as e:
            load_signing_key("operator", env={"HEADWATER_OPERATOR_KEY": f"id:{bad}"})
        assert not (bad and bad in str(e.value)), "key material in an error message"


def test_bytes_signatures_and_keyring_roles(keys, ring):
    sig = sign_bytes(keys["trainer"], b"manifest")
    assert verify_bytes(keys["trainer"].public_key, b"manifest", sig)
    assert not verify_bytes(keys["trainer"].public_key, b"manifest2", sig)
    assert ring.verify_bytes("k-trainer", b"manifest", sig, role="trainer")
    assert not ring.verify_bytes("k-trainer", b"manifest", sig, role="operator")
    assert not ring.verify_bytes("k-nobody", b"manifest", sig, role="trainer")


def test_verifier_needs_a_keyring_unless_insecure(keys):
    with pytest.raises(SigningError, match="HEADWATER_KEYRING_FILE"):
        ControlVerifier.from_env({})
    v = ControlVerifier.from_env({"HEADWATER_INSECURE_CONTROLS": "1"}, clock=lambda: NOW)
    assert v.verify(rollback()) is None  # unsigned accepted, structural checks kept
    assert rejected(v, Control(command="rollback", args={}, issued_at=NOW)) == "no_run"


def test_dev_keys_are_private_stable_and_loadable(tmp_path):
    env = write_dev_keys(str(tmp_path / "keys"))
    assert write_dev_keys(str(tmp_path / "keys")) == env
    ring = Keyring.load(env["HEADWATER_KEYRING_FILE"])
    assert sorted(e.role for e in ring.keys.values()) == ["operator", "sentinel", "trainer"]
    for role in ("operator", "sentinel", "trainer"):
        path = env[f"HEADWATER_{role.upper()}_KEY_FILE"]
        assert os.stat(path).st_mode & 0o777 == 0o600
        key = load_signing_key(role, env=env)
        assert ring.keys[key.key_id].public_key == key.public_key
    assert ControlVerifier.from_env(env).keyring.keys.keys() == ring.keys.keys()


def test_key_files_others_may_read_are_refused(tmp_path, keys):
    path = tmp_path / "op.key"
    path.write_text(keys["operator"].export_secret())
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(SigningError, match="too open") as e:
            load_signing_key("operator", env={"HEADWATER_OPERATOR_KEY_FILE": str(path)})
        assert keys["operator"].export_secret().split(":")[1] not in str(e.value)
    path.chmod(0o400)
    assert load_signing_key("operator", env={"HEADWATER_OPERATOR_KEY_FILE": str(path)}).key_id == "k-operator"


def test_keyrings_others_may_change_are_refused_and_commands_must_be_a_list(tmp_path, keys, ring):
    path = tmp_path / "keyring.json"
    ring.save(str(path))
    for mode in (0o664, 0o646, 0o666):
        path.chmod(mode)
        with pytest.raises(SigningError, match="go-w"):
            Keyring.load(str(path))
    path.chmod(0o644)  # readable by all is fine: it holds public keys
    assert Keyring.load(str(path)).keys.keys() == ring.keys.keys()
    if os.getuid() == 0:  # only root can give a file away; owned by root is accepted (as by ssh)
        os.chown(path, 12345, -1)
        with pytest.raises(SigningError, match="owned by uid 12345"):
            Keyring.load(str(path))
        key = tmp_path / "op.key"
        key.write_text(keys["operator"].export_secret())
        key.chmod(0o600)
        os.chown(key, 12345, -1)
        with pytest.raises(SigningError, match="owned by uid 12345"):
            load_signing_key("operator", env={"HEADWATER_OPERATOR_KEY_FILE": str(key)})
    doc = ring.to_dict()
    doc["keys"]["k-operator"]["commands"] = "rollback"
    with pytest.raises(SigningError, match="commands must be a list"):
        Keyring.from_dict(doc)


def test_a_misformatted_secret_is_not_echoed_as_its_key_id(keys):
    seed = keys["operator"].export_secret().split(":")[1]
    for bad in (f"{seed}:k-operator", f"{seed}:", f"{seed}\nk-operator:x", f"k op:{seed}"):
        with pytest.raises(SigningError) as e:
            load_signing_key("operator", env={"HEADWATER_OPERATOR_KEY": bad})
        assert seed not in str(e.value) and seed[:20] not in str(e.value), "key material in an error message"
    with pytest.raises(SigningError):
        generate_keypair("a" * 65, "operator")


def test_a_clock_stepped_back_does_not_reopen_a_replay(keys, ring):
    now = [NOW]
    v = ControlVerifier(ring, window_s=300, max_skew_s=30, clock=lambda: now[0])
    first = sign_control(rollback(), keys["operator"])
    v.verify(first)
    now[0] = NOW + 301  # accepting another control drops `first` from the seen ids
    v.verify(sign_control(at(rollback(), now[0]), keys["operator"]))
    assert first.control_id not in v.seen
    now[0] = NOW + 200  # the wall clock is stepped back (NTP)
    assert rejected(v, first) == "stale"


def test_a_flood_of_forgeries_pages_once_per_reason_then_counts_what_it_suppressed(keys, ring):
    now = [0.0]
    alerts = RejectionAlerts("ingest", cooldown_s=60, clock=lambda: now[0])
    v = verifier(ring)
    raised = []
    for i in range(200):
        forged = Control(command="pause_source", args={"source": "s"}, issued_at=NOW, control_id=f"evil-{i}",
                         key_id="k-operator", issued_by="k-operator", signature="AAAA" if i % 2 else "")
        with pytest.raises(ControlRejected) as e:
            v.verify(forged)
        raised.append(alerts(forged, e.value))
    sent = [a for a in raised if a is not None]
    assert sorted(a.evidence["reason"] for a in sent) == ["bad_signature", "unsigned"]
    assert {a.dedup_key for a in sent} == {"control.rejected:ingest:unsigned", "control.rejected:ingest:bad_signature"}
    now[0] = 61.0
    forged = dataclasses.replace(forged, control_id="evil-next")
    with pytest.raises(ControlRejected) as e:
        v.verify(forged)
    later = alerts(forged, e.value)
    assert later.evidence["suppressed"] == 99 and "+99 more" in later.message


def test_untrusted_strings_are_logged_as_short_reprs(keys, ring):
    assert brief("a\nb") == "'a\\nb'"
    long = brief("x" * 10_000)
    assert len(long) < 160 and long.endswith("(10002 chars)")
    forged = Control(command="pause_source", args={"source": "s"}, issued_at=NOW, key_id="k\n" + "y" * 10_000,
                     control_id="c\nFAKE LOG LINE", signature="AAAA")
    with pytest.raises(ControlRejected) as e:
        verifier(ring).verify(forged)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_rejection_alerts_of_huge_forgeries_stay_small(keys, ring):
    big = "A" * 500_000
    forged = Control(command="pause_source", args={"source": "s", "pad": big}, key_id=big, issued_by=big,
                     signature="x", control_id=big, issued_at=NOW)
    with pytest.raises(ControlRejected) as e:
        verifier(ring).verify(forged)
    alert = rejection_alert(forged, e.value, consumer="ingest")
    assert len(alert.to_bytes()) < 8192
    assert alert.evidence["args"]["truncated"] and alert.evidence["args"]["chars"] > 500_000
    small = sign_control(Control(command="pause_source", args={"source": "s"}, issued_at=NOW - 10_000),
                         keys["operator"])
    with pytest.raises(ControlRejected) as e:
        verifier(ring).verify(small)
    assert rejection_alert(small, e.value, consumer="ingest").evidence["args"] == {"source": "s"}
