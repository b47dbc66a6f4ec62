"""The Kafka ACLs (streams/access.py -> users.yaml) agree with what the code does.

The test reads each component's code (``Access.code``) and finds every Kafka use: ``publish``,
``producer.send``, ``make_consumer(topics=, group_id=)``, ``TopicPartition("topic", p)``, the
topic-taking helpers (``TopicFollower``, ``EvalLedger``, ``ControlFollower``, ``ControlHook``,
``ConsumerGuard``, ``KafkaSourceConfig``) and any function of the component that forwards a topic
parameter to one of these. A topic given by name (a config field, a CLI option, a parameter
default) resolves to the values assigned to that name in the component's code. It fails when
code uses a topic or group its credential lacks, when a credential grants what no code uses,
or when a Kafka call's topic cannot be resolved.
"""

from __future__ import annotations

import ast
import inspect
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from beam_jobs.control import ControlFollower
from evaluators.alerts.control import ControlHook
from evaluators.ledger import EvalLedger
from infra.deploy.kafka import generate
from streams.access import ACCESS, Access
from streams.guard import ConsumerGuard
from streams.topics import RAW_TOPICS, TOPICS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("beam_jobs", "trainer", "evaluators", "infra")
LOCAL_ONLY = {  # Kafka users that run only against the embedded broker (no ACLs), never deployed
    "infra/demo.py": "the whole loop on the embedded broker",
    "infra/broker_cli.py": "`headwater up|down|topics`: admin of the embedded broker",
}
READ, WRITE, GROUP = "read", "write", "group"
# callee -> {parameter: operation}; a parameter left out of a call takes the signature's default
HELPERS: dict[str, tuple[object | None, dict[str, str]]] = {
    "TopicFollower": (None, {"topics": READ}),
    "EvalLedger": (EvalLedger, {"topic": READ}),
    "ControlFollower": (ControlFollower, {"topic": READ}),
    "ControlHook": (ControlHook, {"topic": WRITE}),
    "ConsumerGuard": (ConsumerGuard, {"dlq_topic": WRITE, "alerts_topic": WRITE}),
    "KafkaSourceConfig": (None, {"topics": READ, "group": GROUP}),
}
POSITIONAL = {"publish": ("producer", "topic_name"), "send": ("topic",), "_send": ("topic",),
              "TopicFollower": ("settings", "topics"), "TopicPartition": ("topic", "partition")}


def _files(code: tuple[str, ...]) -> list[Path]:
    out = []
    for entry in code:
        p = ROOT / entry
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _rel(f: Path) -> str:
    return str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f)


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _topic_strings(value: str) -> set[str] | None:
    parts = [p for p in value.split(",") if p]
    return set(parts) if parts and all(p in TOPICS or p.startswith("headwater-") for p in parts) else None


class Scan:
    """Kafka uses found in one component's code."""

    def __init__(self, files: list[Path]):
        self.trees = {f: ast.parse(f.read_text(), filename=str(f)) for f in files}
        self.values: dict[str, set[str]] = defaultdict(set)  # identifier -> strings assigned to it
        self.forwarders: dict[str, dict[str, str]] = {}  # function -> {topic parameter: operation}
        self.uses: dict[tuple[str, str], list[str]] = defaultdict(list)  # (op, topic or group) -> places
        self.unresolved: list[str] = []
        self.positional = dict(POSITIONAL)
        for tree in self.trees.values():
            self._collect_values(tree)
        for _ in range(3):  # forwarders of forwarders
            for tree in self.trees.values():
                self._collect_forwarders(tree)
        for f, tree in self.trees.items():
            self._collect_uses(f, tree)

    # -- names and their values ---------------------------------------------------------------
    def _bind(self, name: str | None, value: ast.AST | None) -> None:
        if name is None or value is None:
            return
        for node in ast.walk(value):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (s := _topic_strings(node.value)):
                self.values[name] |= s
            elif isinstance(node, ast.Name) and node.id == "RAW_TOPICS":
                self.values[name] |= set(RAW_TOPICS)

    def _collect_values(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign):
                self._bind(_name(node.target), node.value)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    self._bind(_name(t), node.value)
            elif isinstance(node, ast.Call):
                for kw in node.keywords:
                    self._bind(kw.arg, kw.value)
                if _name(node.func) == "add_argument" and node.args and isinstance(node.args[0], ast.Constant):
                    dest = str(node.args[0].value).lstrip("-").replace("-", "_")
                    for kw in node.keywords:
                        if kw.arg == "default":
                            self._bind(dest, kw.value)

    def resolve(self, expr: ast.AST, fn: ast.FunctionDef | None = None) -> set[str] | None | str:
        """The topics/groups ``expr`` may name, None when it cannot tell, or FORWARDED when it is a
        parameter of ``fn`` without a default (``fn``'s callers name the topic)."""
        if isinstance(expr, ast.Name) and fn is not None and expr.id in (params := _params_of(fn)):
            default = params[expr.id]
            return FORWARDED if default is None else self.resolve(default)
        if isinstance(expr, ast.Constant):
            if expr.value is None:
                return set()
            return _topic_strings(expr.value) if isinstance(expr.value, str) else None
        if isinstance(expr, (ast.List, ast.Tuple, ast.Set)):
            parts = [self.resolve(e.value if isinstance(e, ast.Starred) else e, fn) for e in expr.elts]
            return None if any(not isinstance(p, set) for p in parts) else set().union(*parts)
        if isinstance(expr, ast.Call) and _name(expr.func) == "raw_topic":
            return set(RAW_TOPICS)
        if isinstance(expr, ast.Name) and expr.id == "RAW_TOPICS":
            return set(RAW_TOPICS)
        found: set[str] = set()
        for node in ast.walk(expr):  # names inside (attribute chains, comprehensions): their values
            if isinstance(node, ast.Attribute) or (isinstance(node, ast.Name) and node is not expr):
                found |= self.values.get(_name(node) or "", set())
            elif isinstance(node, ast.Name):
                found |= self.values.get(node.id, set())
        return found or None

    # -- calls ------------------------------------------------------------------------------------
    def _params(self, call: ast.Call, callee: str) -> dict[str, ast.AST]:
        given = {kw.arg: kw.value for kw in call.keywords if kw.arg}
        names = self.positional.get(callee)
        helper = HELPERS.get(callee, (None, {}))[0]
        if names is None and helper is not None:
            names = tuple(p for p in inspect.signature(helper).parameters if p != "self")
        for n, a in zip(names or (), call.args, strict=False):
            given.setdefault(n, a)
        return given

    def _ops(self, call: ast.Call) -> list[tuple[str, str, ast.AST | None, object]]:
        """(operation, parameter, expression or None for the default, default) per topic argument."""
        callee = _name(call.func)
        p = self._params(call, callee or "")
        if callee == "publish":
            return [(WRITE, "topic_name", p.get("topic_name"), None)]
        if callee in ("send", "_send"):
            arg = p.get("topic")
            if isinstance(arg, ast.Constant) and not (isinstance(arg.value, str) and arg.value in TOPICS):
                return []  # not a Kafka send
            return [(WRITE, "topic", arg, None)]
        if callee == "make_consumer":
            out = [(READ, "topics", p["topics"], None)] if "topics" in p else []
            return out + ([(GROUP, "group_id", p["group_id"], None)] if "group_id" in p else [])
        if callee == "TopicPartition":  # partitions of a topic: counted when named here
            return [(READ, "topic", p["topic"], None)] if "topic" in p else []
        if callee in HELPERS:
            helper, params = HELPERS[callee]
            sig = inspect.signature(helper).parameters if helper is not None else {}
            return [(op, name, p.get(name), sig[name].default if name in sig else None)
                    for name, op in params.items() if name in p or name in sig]
        if callee in self.forwarders:
            return [(op, name, p.get(name), None) for name, op in self.forwarders[callee].items()]
        return []

    def _collect_forwarders(self, tree: ast.AST) -> None:
        for call, fn in _calls(tree):
            if _name(call.func) == "TopicPartition":
                continue
            for op, _, expr, _ in self._ops(call):
                if fn is not None and expr is not None and self.resolve(expr, fn) is FORWARDED:
                    self.forwarders.setdefault(fn.name, {})[expr.id] = op
                    self.positional.setdefault(fn.name, tuple(
                        a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg != "self"))

    def _collect_uses(self, f: Path, tree: ast.AST) -> None:
        for call, fn in _calls(tree):
            where = f"{_rel(f)}:{call.lineno}"
            for op, _name_, expr, default in self._ops(call):
                values = ({default} if isinstance(default, str) else set()) if expr is None else self.resolve(expr, fn)
                if values is FORWARDED or (values is None and _name(call.func) == "TopicPartition"):
                    continue  # the callers of ``fn`` are the uses; a partition of a topic named elsewhere
                if values is None:
                    self.unresolved.append(f"{where}: {op} of {ast.unparse(expr)!r}")
                    continue
                for v in values:
                    self.uses[(op, v)].append(where)


FORWARDED = "forwarded"


def _params_of(fn: ast.FunctionDef) -> dict[str, ast.AST | None]:
    """A function's parameters (without self) and their default expressions."""
    args = fn.args
    pos = args.posonlyargs + args.args
    out: dict[str, ast.AST | None] = {a.arg: None for a in pos + args.kwonlyargs if a.arg != "self"}
    out.update({a.arg: d for a, d in zip(pos[len(pos) - len(args.defaults):], args.defaults, strict=True)})
    out.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None})
    return out


def _calls(tree: ast.AST, fn: ast.FunctionDef | None = None):
    """Every call with its innermost enclosing function."""
    for node in ast.iter_child_nodes(tree):
        inner = node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else fn
        if isinstance(node, ast.Call):
            yield node, fn
        yield from _calls(node, inner)


def _kafka_modules() -> set[str]:
    """Repository modules (outside streams/) that call into Kafka at all."""
    hits = set()
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            text = f.read_text()
            if any(k in text for k in ("make_producer(", "make_consumer(", "make_admin(", "KafkaConsumer(",
                                       "KafkaProducer(", "ConsumerGuard(")):
                hits.add(str(f.relative_to(ROOT)))
    return hits


def _declared(a: Access) -> set[tuple[str, str]]:
    return {(READ, t) for t in a.reads} | {(WRITE, t) for t in a.writes} | {(GROUP, g) for g in a.groups}


@pytest.mark.parametrize("component", [c for c, a in ACCESS.items() if a.code])
def test_component_code_uses_exactly_the_rights_its_credential_grants(component):
    a = ACCESS[component]
    scan = Scan(_files(a.code))
    assert not scan.unresolved, f"{component}: Kafka calls whose topic the ACL test cannot resolve: {scan.unresolved}"
    used = set(scan.uses)
    if a.describe_all:  # a monitor reads no records, joins no group, writes nothing
        assert not used, f"{component} is describe-only but its code does {sorted(used)}"
        return
    missing = {u: scan.uses[u] for u in used - _declared(a)}
    assert not missing, f"{component}'s credential lacks what its code does (broker would refuse): {missing}"
    unused = _declared(a) - used
    assert not unused, f"{component}'s credential grants what no code does (least privilege): {sorted(unused)}"


def test_every_deployed_kafka_client_belongs_to_one_component():
    owners: dict[str, list[str]] = defaultdict(list)
    for name, a in ACCESS.items():
        for f in _files(a.code):
            owners[str(f.relative_to(ROOT))].append(name)
    shared = {f: c for f, c in owners.items() if len(c) > 1}
    assert not shared, f"files claimed by several credentials: {shared}"
    orphans = _kafka_modules() - set(owners) - set(LOCAL_ONLY)
    assert not orphans, f"Kafka clients that no credential in streams/access.py covers: {sorted(orphans)}"


def test_users_yaml_is_the_declaration():
    users = {d["metadata"]["name"]: d["spec"]["authorization"]["acls"]
             for d in yaml.safe_load_all((ROOT / "infra/deploy/kafka/users.yaml").read_text())}
    assert set(users) == {f"headwater-{c}" for c in ACCESS}
    for name, a in ACCESS.items():
        acls = users[f"headwater-{name}"]
        got = {(READ, x["resource"]["name"]) for x in acls if x["resource"]["type"] == "topic" and "Read" in x["operations"]}
        got |= {(WRITE, x["resource"]["name"]) for x in acls if "Write" in x["operations"]}
        got |= {(GROUP, x["resource"]["name"]) for x in acls if x["resource"]["type"] == "group"
                and "Read" in x["operations"]}
        assert got == _declared(a), name
    assert ("write", "control") not in {(o, t) for o, t in _declared(ACCESS["evaluator"])}  # loads checkpoints
    assert ACCESS["sentinel"] is not ACCESS["evaluator"] and "control" in ACCESS["sentinel"].reads
    assert "alerts" in ACCESS["ingest"].writes  # codebook-collapse alerts (beam_jobs/media_hook.py)
    assert generate.main(["--check"]) == 0


def test_the_scan_catches_a_divergence(tmp_path):
    """The check is live: code publishing where its credential may not is reported."""
    rogue = tmp_path / "rogue.py"
    rogue.write_text("from streams.kafka import publish\n\n"
                     "def f(producer, event, topic: str = 'control'):\n    publish(producer, topic, event)\n\n"
                     "def g(producer, event):\n    publish(producer, 'alerts', event)\n    f(producer, event)\n"
                     "    make_consumer(s, topics=[name])\n")
    scan = Scan([rogue])
    assert set(scan.uses) == {(WRITE, "control"), (WRITE, "alerts")}
    assert scan.unresolved and "name" in scan.unresolved[0]
