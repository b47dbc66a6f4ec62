"""Signed controls: Ed25519 keys, the keyring of who may do what, and Control verification.

Keys (``cryptography``'s Ed25519) are named by a ``key_id`` and carry a role:

- ``operator``: people, through ``headwater control ...``; may issue every command.
- ``sentinel``: automatic actions from alerts; every command except lifting a block
  (``resume_source``, ``resume_domain``): only a person undoes a quarantine or a pause.
- ``trainer``: signs checkpoint manifests (:func:`sign_bytes`); may issue no control.

A private key is one line ``<key_id>:<base64 of the 32-byte seed>`` (key ids: ``[A-Za-z0-9._-]``,
at most 64), read from the file named by ``HEADWATER_<ROLE>_KEY_FILE`` (refused unless private to its
owner, like ssh) or from ``HEADWATER_<ROLE>_KEY``. It is never logged:
:class:`SigningKey`'s repr shows only its id and role. The public side is a keyring, a JSON
file named by ``HEADWATER_KEYRING_FILE``::

    {"version": 1, "keys": {"<key_id>": {"public_key": "<b64>", "role": "operator",
                                         "commands": ["rollback", ...]}}}

``commands`` (a list) may narrow what the role allows, never widen it. The keyring decides who
may steer headwater, so like ssh's ``authorized_keys`` it is refused unless owned by the user
running the process (or root) and writable by nobody else. Rotation: add the new key to the
keyring, switch the signer to it, then remove the old entry.

A control's signature covers ``CONTROL_CONTEXT`` + the canonical JSON (sorted keys, no
whitespace, no NaN) of every field but ``signature``; ``issued_by`` must equal ``key_id``.
:class:`ControlVerifier` checks signature, permission, run, clock window and replay. Commands
only a trainer obeys (:data:`RUN_COMMANDS`) must name the run (``args.run_id``, of
:data:`RUN_ID_PATTERN`): nothing signed applies to every run at once.

Consumers raise a ``control.rejected`` Alert for what they refuse, through
:class:`RejectionAlerts`: one per (consumer, reason) per cooldown, the next one counting the
rejections suppressed meanwhile, so a flood of forgeries pages once, not once per forgery.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from streams.events import CONTROL_COMMANDS, Alert, Control

__all__ = [
    "CONTROL_CONTEXT",
    "INSECURE_ENV",
    "KEYRING_ENV",
    "KEY_ID_PATTERN",
    "REJECTED_RULE",
    "REJECT_REASONS",
    "ROLES",
    "ROLE_COMMANDS",
    "RUN_COMMANDS",
    "RUN_ID_PATTERN",
    "ControlRejected",
    "ControlVerifier",
    "KeyEntry",
    "Keyring",
    "RejectionAlerts",
    "SigningError",
    "SigningKey",
    "brief",
    "canonical_control_bytes",
    "generate_keypair",
    "load_signing_key",
    "rejection_alert",
    "sign_bytes",
    "sign_control",
    "verify_bytes",
    "write_dev_keys",
]

log = logging.getLogger(__name__)
KEYRING_ENV = "HEADWATER_KEYRING_FILE"
INSECURE_ENV = "HEADWATER_INSECURE_CONTROLS"
CONTROL_CONTEXT = b"headwater.control.v2\n"
ROLE_COMMANDS: dict[str, frozenset[str]] = {
    "operator": frozenset(CONTROL_COMMANDS),
    "sentinel": frozenset(CONTROL_COMMANDS) - {"resume_source", "resume_domain"},
    "trainer": frozenset(),
}
ROLES = tuple(ROLE_COMMANDS)
REJECTED_RULE = "control.rejected"
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""what a key id may look like; anything else is refused without being echoed (it may be a secret)"""
RUN_COMMANDS = frozenset({"rollback", "pause_domain", "resume_domain", "quarantine_shards"})
"""commands only a trainer run obeys: each must name its run in ``args.run_id``"""
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""what a run id may look like (the trainer's default is ``run-<8 hex>``)"""
LOG_CHARS = 120  # untrusted strings in log lines: repr, cut to this
ALERT_FIELD_CHARS = 256  # untrusted strings copied into a control.rejected Alert are cut to this
ALERT_ARGS_CHARS = 2048  # args larger than this (as JSON) are replaced by their size and SHA-256
REJECT_REASONS = ("unsigned", "unknown_key", "malformed", "bad_signature", "issuer_mismatch",
                  "not_permitted", "no_run", "non_finite_time", "stale", "future", "replayed")


class SigningError(ValueError):
    """A key or keyring is missing or malformed (the message never contains key material)."""


def brief(value: object, limit: int = LOG_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: how to log a string a sender chose (no
    newlines or control characters reach the log, nor megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class ControlRejected(Exception):
    """A control failed verification; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError):
        raise SigningError(f"{what} is not valid base64") from None


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private Ed25519 key with its id and role; repr shows no key material."""

    key_id: str
    role: str
    _private: Ed25519PrivateKey = field(repr=False, compare=False)

    @property
    def public_key(self) -> str:
        """The public key, base64 of its 32 raw bytes (what the keyring stores)."""
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return _b64(raw)

    def export_secret(self) -> str:
        """The ``<key_id>:<b64 seed>`` line to store in a 0600 key file; never log it."""
        seed = self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())
        return f"{self.key_id}:{_b64(seed)}"

    @classmethod
    def parse(cls, secret: str, *, role: str) -> SigningKey:
        """Parse a ``<key_id>:<b64 seed>`` line."""
        key_id, sep, seed = secret.strip().partition(":")
        if not sep or not KEY_ID_PATTERN.fullmatch(key_id):  # key_id is not echoed: it may be the seed
            raise SigningError(f"{role} key: expected '<key_id>:<base64 seed>' with a key_id of "
                               f"{KEY_ID_PATTERN.pattern}")
        raw = _unb64(seed, f"{role} key {key_id!r}")
        if len(raw) != 32:
            raise SigningError(f"{role} key {key_id!r}: seed must be 32 bytes, got {len(raw)}")
        return cls(key_id, role, Ed25519PrivateKey.from_private_bytes(raw))


def generate_keypair(key_id: str, role: str) -> SigningKey:
    """A fresh random key for ``role`` (its public half is ``.public_key``)."""
    if role not in ROLE_COMMANDS:
        raise SigningError(f"unknown role {role!r}; expected one of {ROLES}")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise SigningError(f"key_id must match {KEY_ID_PATTERN.pattern}")
    return SigningKey(key_id, role, Ed25519PrivateKey.generate())


def load_signing_key(role: str, *, env: Mapping[str, str] | None = None, required: bool = True) -> SigningKey | None:
    """The ``role`` key from ``HEADWATER_<ROLE>_KEY_FILE`` (preferred) or ``HEADWATER_<ROLE>_KEY``.

    Like ssh, a key file that its group or others may access is refused (``chmod 600``)."""
    env = os.environ if env is None else env
    name = f"HEADWATER_{role.upper()}_KEY"
    path = env.get(f"{name}_FILE")
    if path:
        try:
            with open(path) as f:
                st = os.fstat(f.fileno())
                if st.st_uid != os.getuid():
                    raise SigningError(f"{name}_FILE={path}: owned by uid {st.st_uid}, not by this user "
                                       f"({os.getuid()}); the key must be private to its owner")
                if (mode := st.st_mode) & 0o077:
                    raise SigningError(f"{name}_FILE={path}: permissions {stat.S_IMODE(mode):04o} are too "
                                       "open; the key must be private to its owner (chmod 600)")
                return SigningKey.parse(f.read(), role=role)
        except OSError as e:
            raise SigningError(f"{name}_FILE={path}: cannot read ({e.strerror})") from None
    if env.get(name):
        return SigningKey.parse(env[name], role=role)
    if required:
        raise SigningError(f"no {role} key: set {name}_FILE (a 0600 file) or {name}; "
                           "`headwater up` writes local development keys")
    return None


def sign_bytes(key: SigningKey, data: bytes) -> str:
    """Base64 Ed25519 signature of ``data``; callers prefix a context string of their own."""
    return _b64(key._private.sign(data))


def verify_bytes(public_key: str, data: bytes, signature: str) -> bool:
    """True when ``signature`` (base64) is ``public_key``'s (base64) signature of ``data``."""
    try:
        pub = Ed25519PublicKey.from_public_bytes(_unb64(public_key, "public key"))
        pub.verify(_unb64(signature, "signature"), data)
    except (SigningError, InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One keyring entry: a public key, its role and the commands it may issue."""

    key_id: str
    public_key: str
    role: str
    commands: frozenset[str]


@dataclass(slots=True)
class Keyring:
    """Public keys by id, each with its role and permitted commands."""

    keys: dict[str, KeyEntry] = field(default_factory=dict)

    def add(self, key_id: str, public_key: str, role: str, commands: Iterable[str] | None = None) -> KeyEntry:
        """Add (or replace) a key; ``commands`` may narrow the role's commands, never widen them."""
        if role not in ROLE_COMMANDS:
            raise SigningError(f"keyring {key_id!r}: unknown role {role!r}; expected one of {ROLES}")
        allowed = ROLE_COMMANDS[role] if commands is None else frozenset(commands)
        if extra := allowed - ROLE_COMMANDS[role]:
            raise SigningError(f"keyring {key_id!r}: role {role!r} may not issue {sorted(extra)}")
        if len(_unb64(public_key, f"keyring {key_id!r} public_key")) != 32:
            raise SigningError(f"keyring {key_id!r}: public_key must be 32 bytes")
        entry = KeyEntry(key_id, public_key, role, allowed)
        self.keys[key_id] = entry
        return entry

    def verify_bytes(self, key_id: str, data: bytes, signature: str, *, role: str) -> bool:
        """True when ``key_id`` is in the keyring with ``role`` and signed ``data``."""
        entry = self.keys.get(key_id)
        return entry is not None and entry.role == role and verify_bytes(entry.public_key, data, signature)

    def to_dict(self) -> dict:
        return {"version": 1, "keys": {k: {"public_key": e.public_key, "role": e.role,
                                           "commands": sorted(e.commands)} for k, e in sorted(self.keys.items())}}

    @classmethod
    def from_dict(cls, obj: object) -> Keyring:
        if not isinstance(obj, dict) or type(obj.get("version")) is not int or obj["version"] != 1 \
                or not isinstance(obj.get("keys"), dict):
            raise SigningError('keyring: expected {"version": 1, "keys": {...}}')
        ring = cls()
        for key_id, e in obj["keys"].items():
            if not isinstance(e, dict) or not isinstance(e.get("public_key"), str):
                raise SigningError(f"keyring {key_id!r}: expected an object with public_key and role")
            commands = e.get("commands")
            if commands is not None and not (isinstance(commands, list) and all(isinstance(c, str) for c in commands)):
                raise SigningError(f"keyring {key_id!r}: commands must be a list of command names, e.g. "
                                   f'["rollback"], got {type(commands).__name__}')
            ring.add(key_id, e["public_key"], str(e.get("role")), e.get("commands"))
        return ring

    @classmethod
    def load(cls, path: str) -> Keyring:
        """Read a keyring file; refused (like ssh's authorized_keys) unless it is owned by this
        user or root and neither its group nor others may write it."""
        try:
            with open(path) as f:
                st = os.fstat(f.fileno())
                if st.st_uid not in (os.getuid(), 0):
                    raise SigningError(f"keyring {path}: owned by uid {st.st_uid}, not by this user "
                                       f"({os.getuid()}) or root; whoever owns it decides who may steer headwater")
                if st.st_mode & 0o022:
                    raise SigningError(f"keyring {path}: permissions {stat.S_IMODE(st.st_mode):04o} let "
                                       "others change who may steer headwater (chmod go-w)")
                obj = json.load(f)
        except OSError as e:
            raise SigningError(f"keyring {path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise SigningError(f"keyring {path}: not valid JSON ({e})") from None
        return cls.from_dict(obj)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Keyring | None:
        """The keyring named by ``HEADWATER_KEYRING_FILE``, or None when it is unset."""
        env = os.environ if env is None else env
        path = env.get(KEYRING_ENV)
        return cls.load(path) if path else None

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)


def canonical_control_bytes(control: Control) -> bytes:
    """What a control's signature covers: the context, then sorted compact JSON without ``signature``."""
    body = control.to_dict()
    body.pop("signature", None)
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ControlRejected("malformed", f"not canonical JSON: {e}") from None
    return CONTROL_CONTEXT + text.encode("ascii")


def sign_control(control: Control, key: SigningKey) -> Control:
    """A copy of ``control`` with ``key_id``/``issued_by`` set to the key's id, then signed."""
    unsigned = replace(control, key_id=key.key_id, issued_by=key.key_id, signature="")
    return replace(unsigned, signature=sign_bytes(key, canonical_control_bytes(unsigned)))


class ControlVerifier:
    """Accepts a Control only if it is signed by a keyring key allowed its command, names a run
    (rollbacks), is within ``[now - window_s, now + max_skew_s]`` and was not seen before.

    ``insecure=True`` (development only, no keyring) skips the signature checks and keeps the rest.
    Seen control ids are kept while they are inside the window, so the cache stays bounded.
    """

    def __init__(self, keyring: Keyring | None, *, window_s: float = 300.0, max_skew_s: float = 30.0,
                 clock: Callable[[], float] = time.time, insecure: bool = False):
        if keyring is None and not insecure:
            raise SigningError(f"no keyring: set {KEYRING_ENV} (or {INSECURE_ENV}=1 for development only)")
        self.keyring, self.insecure = keyring, insecure
        self.window_s, self.max_skew_s, self.clock = window_s, max_skew_s, clock
        self.seen: dict[str, float] = {}  # control_id -> issued_at
        self.latest = -math.inf  # the latest clock reading: a clock stepped back must not reopen replays
        if insecure:
            log.warning("%s=1: controls are NOT authenticated; anyone who can write to the control "
                        "topic can steer this process (development only)", INSECURE_ENV)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs) -> ControlVerifier:
        """From ``HEADWATER_KEYRING_FILE``; raises :class:`SigningError` when it is unset, unless
        ``HEADWATER_INSECURE_CONTROLS=1`` (then unsigned controls are accepted)."""
        env = os.environ if env is None else env
        keyring = Keyring.from_env(env)
        return cls(keyring, insecure=keyring is None and env.get(INSECURE_ENV) == "1", **kwargs)

    def authenticate(self, control: Control) -> KeyEntry | None:
        """Signature, issuer, permission, run and a finite time; no clock window, no replay check."""
        if not math.isfinite(control.issued_at):
            raise ControlRejected("non_finite_time", f"issued_at={control.issued_at!r}")
        entry = None if self.insecure else self._check_signature(control)
        run_id = control.args.get("run_id")
        if control.command in RUN_COMMANDS and not run_id:
            raise ControlRejected("no_run", f"{control.command} must name args.run_id")
        if run_id is not None and not (isinstance(run_id, str) and RUN_ID_PATTERN.fullmatch(run_id)):
            raise ControlRejected("no_run", f"args.run_id {brief(run_id)} does not match {RUN_ID_PATTERN.pattern}")
        return entry

    def _check_signature(self, control: Control) -> KeyEntry:
        if not control.signature or not control.key_id:
            raise ControlRejected("unsigned", f"control {brief(control.control_id)} has no signature")
        entry = self.keyring.keys.get(control.key_id)
        if entry is None:
            raise ControlRejected("unknown_key", f"key_id {brief(control.key_id)} is not in the keyring")
        if not verify_bytes(entry.public_key, canonical_control_bytes(control), control.signature):
            raise ControlRejected("bad_signature", f"signature does not match key {brief(control.key_id)}")
        if control.issued_by != control.key_id:
            raise ControlRejected("issuer_mismatch", f"issued_by {brief(control.issued_by)} != key_id {control.key_id!r}")
        if control.command not in entry.commands:
            raise ControlRejected("not_permitted", f"{entry.role} key {entry.key_id!r} may not issue {control.command}")
        return entry

    def verify(self, control: Control, *, catch_up: bool = False) -> KeyEntry | None:
        """:meth:`authenticate`, then the clock window and replay check; records the id as seen.

        ``catch_up=True`` is for consumers that replay the control log from its start and keep
        last-writer-wins state themselves (ingest): no freshness window, no seen-id cache; a
        control from the future is still rejected."""
        entry = self.authenticate(control)
        now = self.clock()
        if control.issued_at > now + self.max_skew_s:
            raise ControlRejected("future", f"issued {control.issued_at - now:.1f}s in the future")
        if catch_up:
            return entry
        # ids leave `seen` once stale by the latest clock reading, so staleness is judged by it too
        self.latest = now = max(self.latest, now)
        if control.issued_at < now - self.window_s:
            raise ControlRejected("stale", f"issued {now - control.issued_at:.1f}s ago (window {self.window_s:.0f}s)")
        if control.control_id in self.seen:
            raise ControlRejected("replayed", f"control_id {brief(control.control_id)} was already accepted")
        horizon = now - self.window_s
        self.seen = {cid: t for cid, t in self.seen.items() if t >= horizon}
        self.seen[control.control_id] = control.issued_at
        return entry


def rejection_alert(control: Control, error: ControlRejected, *, consumer: str, **evidence: object) -> Alert:
    """The critical ``control.rejected`` Alert a consumer raises for a control it refused.

    The control is the sender's (maybe an attacker's): its strings are cut to
    :data:`ALERT_FIELD_CHARS` and args larger than :data:`ALERT_ARGS_CHARS` are replaced by their
    size and SHA-256, so a forged control never yields an alert larger than a few KiB."""
    control_id, detail = _clip(control.control_id), _clip(error.detail)
    more = evidence.get("suppressed")
    more = f" (+{more} more {error.reason} rejections not alerted since the last alert)" if more else ""
    return Alert(
        rule=REJECTED_RULE, severity="critical", source=consumer,
        message=f"{consumer} rejected {_clip(control.command)} {control_id} ({error.reason}): {detail}{more}",
        dedup_key=f"{REJECTED_RULE}:{consumer}:{error.reason}",  # never an id the sender chose
        evidence={"reason": error.reason, "detail": detail, "control_id": control_id,
                  "command": control.command, "args": _bounded_args(control.args),
                  "key_id": _clip(control.key_id), "issued_by": _clip(control.issued_by),
                  "consumer": consumer, **evidence},
    )


class RejectionAlerts:
    """Rate limit of one consumer's ``control.rejected`` alerts: at most one per reason per
    ``cooldown_s``; the next one carries ``suppressed`` (rejections of that reason not alerted
    since the last alert). Every rejection is still logged by the consumer."""

    def __init__(self, consumer: str, *, cooldown_s: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.consumer, self.cooldown_s, self.clock = consumer, cooldown_s, clock
        self._last: dict[str, float] = {}  # reason -> when its last alert was raised
        self._suppressed: dict[str, int] = {}

    def __call__(self, control: Control, error: ControlRejected, **evidence: object) -> Alert | None:
        """The alert to raise for this rejection, or None inside the reason's cooldown."""
        now, reason = self.clock(), error.reason
        last = self._last.get(reason)
        if last is not None and now - last < self.cooldown_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return None
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        return rejection_alert(control, error, consumer=self.consumer, suppressed=suppressed, **evidence)


def _clip(text: str) -> str:
    return text if len(text) <= ALERT_FIELD_CHARS else f"{text[:ALERT_FIELD_CHARS]}...({len(text)} chars)"


def _bounded_args(args: dict) -> dict:
    text = json.dumps(args, sort_keys=True, separators=(",", ":"), default=repr)
    if len(text) <= ALERT_ARGS_CHARS:
        return args
    return {"truncated": True, "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def write_dev_keys(directory: str) -> dict[str, str]:
    """Create (if absent) a development keyring and one 0600 key file per role under ``directory``;
    return the environment variables that point at them. Existing keys are kept."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ring_path = os.path.join(directory, "keyring.json")
    ring = Keyring.load(ring_path) if os.path.isfile(ring_path) else Keyring()
    env = {KEYRING_ENV: os.path.abspath(ring_path)}
    for role in ROLES:
        path, var = os.path.join(directory, f"{role}.key"), f"HEADWATER_{role.upper()}_KEY_FILE"
        if os.path.isfile(path):
            key = load_signing_key(role, env={var: path})
        else:
            key = generate_keypair(f"dev-{role}-{os.urandom(3).hex()}", role)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key.export_secret() + "\n")
        entry = ring.keys.get(key.key_id)
        if entry is None or entry.public_key != key.public_key:
            ring.add(key.key_id, key.public_key, role)
        env[var] = os.path.abspath(path)
    ring.save(ring_path)
    return env
