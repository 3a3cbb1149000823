"""Fuzzing the real portal from its OpenAPI description (docs/openapi.yaml), with hypothesis.

Each case is one HTTP request sent over a fresh TCP connection (raw bytes: the framing is part
of what is fuzzed) and judged on its answer:

- never a 5xx, and the server keeps answering (no crash);
- a refusal (anything but 2xx, or no answer at all) changes no state: the files of the
  router's state_dir (journal, key mark, archive) and its channels are byte for byte the same;
- the answer is one the description lists for that operation (or a refusal of the HTTP server
  itself, which any path may get) and its JSON matches the listed schema.

API cases follow the description's operations: path parameters and JSON bodies come from its
schemas (from_schema, the subset the description uses), from pools of valid values (keys, addresses, real channel
ids, so requests get past the parsers) and from anything (arbitrary JSON, deep nesting, bytes,
oversized bodies), framed by Content-Length or chunked. Raw cases take such a request and break
its framing: lengths, chunk lines, request line, header fields, truncation, plain garbage.
Used by tests/test_fuzz.py (a short run) and bench/fuzz.py (`fuzz.requests` >= 10,000).
"""

from __future__ import annotations

import collections
import copy
import json
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
# Refusals of the HTTP server itself: any path may get them (openapi.yaml, info.description)
SERVER_CODES = {
    400: {"request_malformed", "http_version_unsupported", "header_malformed", "content_length_invalid",
          "transfer_encoding_unsupported", "chunked_malformed"},
    408: {"request_timeout"}, 413: {"body_too_large"}, 417: {"expectation_failed"},
    429: {"rate_limited", "too_many_connections"}, 431: {"headers_too_large"},
}
METHODS = ("get", "post", "put", "delete", "head", "options", "patch")


def load_spec(path: Path = SPEC_PATH) -> dict:
    return yaml.safe_load(path.read_text())


def inline_refs(node, spec: dict):
    """The schema with every local $ref replaced by its target (the description has no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = spec
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return inline_refs(target, spec)
        return {k: inline_refs(v, spec) for k, v in node.items()}
    if isinstance(node, list):
        return [inline_refs(v, spec) for v in node]
    return node


@dataclass(frozen=True)
class Operation:
    op_id: str
    method: str  # upper case
    path: str  # template, e.g. /api/channels/{channel_id}
    body_schema: dict | None
    responses: dict  # status (str) -> response object (refs inlined)
    query: tuple[tuple[str, dict], ...] = ()  # (name, schema) of its query parameters


def operations(spec: dict) -> list[Operation]:
    out = []
    for path, item in spec["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            params = inline_refs(item.get("parameters", []) + op.get("parameters", []), spec)
            query = tuple((q["name"], q["schema"]) for q in params if q["in"] == "query")
            out.append(Operation(op["operationId"], method.upper(), path,
                                 inline_refs(body, spec) if body else None, inline_refs(op["responses"], spec), query))
    return out


@dataclass
class Answer:
    status: int | None  # None: the server closed without answering (a request cut short)
    headers: dict[str, str]
    body: bytes
    after: bytes = b""  # what followed the answer on the wire (answers to pipelined requests)


def exchange(host: str, port: int, data: bytes, source: str | None = None, timeout: float = 15.0) -> Answer:
    """Send `data`, end the sending side, read to EOF; the first final answer (1xx skipped)."""
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused mid-send (e.g. 413 then closed): the answer is still readable
        raw = b""
        try:
            while chunk := s.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
    if not raw:
        return Answer(None, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length", "")
    after = b""
    if length.isdigit():
        # A mutation can make one request two (a bare LF ends the head: RFC 9112 2.2): the
        # answer to the first is judged; the second answer follows its body on the wire.
        body, after = body[: int(length)], body[int(length):]
    return Answer(int(lines[0].split(" ")[1]), headers, body, after)


@dataclass
class Pools:
    """Valid values, so that generated requests get past the parsers to the channel rules."""

    pubkeys: list[str]
    addresses: list[str]
    channel_ids: list[str]
    txs: list[str] = field(default_factory=list)  # raw transactions, hex
    txids: list[str] = field(default_factory=list)
    proofs: list[str] = field(default_factory=list)  # real proofs (session, close) of the channels


@dataclass
class Case:
    label: str  # operation id, or raw:<mutation>
    data: bytes
    op: Operation | None  # None: a raw case (framing broken on purpose)
    source: str | None = None


@dataclass
class Report:
    requests: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    by_label: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list = field(default_factory=list)
    state_changes: list = field(default_factory=list)
    spec_violations: list = field(default_factory=list)
    dead: str | None = None  # the server stopped answering

    @property
    def problems(self) -> list:
        return self.server_errors + self.state_changes + self.spec_violations + ([self.dead] if self.dead else [])

    def summary(self) -> dict:
        return {"requests": self.requests, "server_errors": len(self.server_errors),
                "state_changes": len(self.state_changes), "spec_violations": len(self.spec_violations),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items(), key=lambda kv: str(kv[0]))}}


# --- strategies ---------------------------------------------------------------------------------

def from_schema(schema: dict) -> st.SearchStrategy:
    """Values of the description's (JSON Schema) schemas: the subset it uses (type, const, enum,
    oneOf, properties/required, pattern, lengths, bounds). Objects keep their required fields
    and any subset of the others."""
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"].replace("^", r"\A", 1).removesuffix("$") + r"\Z")
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 100))
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries({k: from_schema(v) for k, v in props.items() if k in required},
                                 optional={k: from_schema(v) for k, v in props.items() if k not in required})


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40))
json_values = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                              st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                           max_leaves=20)


@st.composite
def deep_json(draw) -> bytes:
    depth = draw(st.sampled_from([17, 40, 1_000, 5_000, 30_000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return (opener * depth + "1" + closer * depth).encode()


def _mutated(value, draw):
    """A valid body with one field dropped, retyped or replaced by anything."""
    if not isinstance(value, dict) or not value:
        return value
    value = dict(value)
    key = draw(st.sampled_from(sorted(value)))
    how = draw(st.sampled_from(["drop", "anything", "string", "huge", "negative", "float"]))
    if how == "drop":
        del value[key]
    elif how == "anything":
        value[key] = draw(json_values)
    elif how == "string":
        value[key] = str(value[key])
    elif how == "huge":
        value[key] = 10 ** draw(st.integers(16, 400))
    elif how == "negative":
        value[key] = -1
    else:
        value[key] = 1.5
    return value


class PortalFuzz:
    def __init__(self, host: str, port: int, pools: Pools, snapshot: Callable[[], object],
                 sources: list[str] | None = None, spec: dict | None = None):
        self.host, self.port, self.pools, self.snapshot = host, port, pools, snapshot
        self.sources = sources or [None]
        self.spec = spec or load_spec()
        self.ops = operations(self.spec)
        self.report = Report()
        self._state = snapshot()
        self._validators: dict[str, Draft202012Validator] = {}

    # --- building requests ----------------------------------------------------------------

    def _valid_body(self, op: Operation, draw) -> dict:
        p = self.pools
        if op.op_id == "open_channel":
            return {"client_pubkey": draw(st.sampled_from(p.pubkeys)),
                    "deposit": draw(st.integers(0, 2_000_000)),
                    "refund_address": draw(st.sampled_from(p.addresses))}
        if op.op_id == "funding":
            body: dict = {}
            if p.txs and draw(st.booleans()):
                body["tx"] = draw(st.sampled_from(p.txs))
            else:
                body["txid"] = draw(st.sampled_from(p.txids) if p.txids else st.from_regex(r"\A[0-9a-f]{64}\Z"))
            if draw(st.booleans()) or "txid" in body:
                body["vout"] = draw(st.integers(0, 3))
            return body
        if op.op_id == "close":
            return {"proof": draw(st.sampled_from(p.proofs) if p.proofs else from_schema(op.body_schema))}
        if op.op_id == "payments":
            return {"amount": draw(st.integers(0, 2_000_000)),
                    "tx": draw(st.sampled_from(p.txs) if p.txs else st.just("00")),
                    "signature": draw(st.from_regex(r"\A30[0-9a-f]{136,140}01\Z"))}
        return {}

    def _body(self, op: Operation, draw) -> tuple[bytes, str | None]:
        kind = draw(st.sampled_from(["schema", "valid", "mutated", "json", "deep", "bytes", "large", "empty"]))
        if kind == "schema":
            value = draw(from_schema(op.body_schema))
        elif kind == "valid":
            value = self._valid_body(op, draw)
        elif kind == "mutated":
            value = _mutated(self._valid_body(op, draw), draw)
        elif kind == "json":
            value = draw(json_values)
        elif kind == "deep":
            return draw(deep_json()), "application/json"
        elif kind == "bytes":
            return draw(st.binary(max_size=300)), draw(st.sampled_from(["application/json", None]))
        elif kind == "large":
            return b'{"tx": "' + b"00" * draw(st.integers(32_760, 40_000)) + b'"}', "application/json"
        else:
            return b"", draw(st.sampled_from(["application/json", None]))
        ctype = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None]))
        return json.dumps(value).encode(), ctype

    def _path(self, op: Operation, draw) -> str:
        path = op.path
        if "{channel_id}" in path:
            cid = draw(st.one_of(st.sampled_from(self.pools.channel_ids) if self.pools.channel_ids else st.nothing(),
                                 st.from_regex(r"\A[0-9a-f]{32}\Z"),
                                 # a "/" (even as %2F) makes it another path: judged as that one it is not
                                 st.text(min_size=1, max_size=80).filter(lambda t: "/" not in t)))
            path = path.replace("{channel_id}", urllib.parse.quote(cid, safe=""))
        if "{path}" in path:
            name = draw(st.one_of(st.sampled_from(["wallet.js", "style.css", "../index.html", "..%2f..%2fetc%2fpasswd",
                                                   "vendor/qr/index.js", "nope.js"]), st.text(min_size=1, max_size=60)))
            path = path.replace("{path}", name if "%" in name else urllib.parse.quote(name, safe="/"))
        if "{anything}" in path:
            path = path.replace("{anything}", urllib.parse.quote(draw(st.text(min_size=1, max_size=60)), safe="/"))
        query = []
        for name, schema in op.query:
            pool = {"channel_id": self.pools.channel_ids, "proof": self.pools.proofs}.get(name)
            choice = draw(st.integers(0, 3))
            if choice == 0:
                continue
            value = (draw(st.sampled_from(pool)) if choice == 1 and pool else
                     draw(from_schema(schema)) if choice == 2 else draw(st.text(max_size=40)))
            query.append(f"{name}={urllib.parse.quote(str(value), safe='')}")
        if draw(st.integers(0, 9)) == 0:
            query.append(urllib.parse.quote(draw(st.text(max_size=40)), safe="=&"))
        return path + ("?" + "&".join(query) if query else "")

    def _request(self, op: Operation, draw) -> tuple[bytes, bool]:
        """(bytes, chunked) of a well-framed request for `op`."""
        method = op.method if draw(st.integers(0, 19)) else draw(st.sampled_from(["PUT", "DELETE", "PATCH", "HEAD"]))
        path = self._path(op, draw)
        headers = [("Host", draw(st.sampled_from(["10.77.1.1:8088", "connectivitycheck.gstatic.com", "example.com"])))]
        headers.append(("Connection", "close"))
        if draw(st.integers(0, 9)) == 0:
            headers.append(("X-Forwarded-For", draw(st.sampled_from(["10.77.1.11", "127.0.0.1", "::1", "junk"]))))
        body, chunked = b"", False
        if op.body_schema is not None or method in ("POST", "PUT", "PATCH"):
            body, ctype = self._body(op, draw) if op.body_schema is not None else (b"{}", "application/json")
            if ctype:
                headers.append(("Content-Type", ctype))
            chunked = draw(st.integers(0, 4)) == 0
            if chunked:
                headers.append(("Transfer-Encoding", "chunked"))
                body = _chunk(body, draw(st.integers(1, 9000)))
            else:
                headers.append(("Content-Length", str(len(body))))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
        return head.encode("utf-8") + body, chunked

    @st.composite
    def cases(draw, self, mutation: str | None = None) -> Case:
        """A request for one of the operations; one in four (or each, with `mutation`) with its
        framing broken on purpose."""
        op = draw(st.sampled_from(self.ops))
        data, _ = self._request(op, draw)
        source = draw(st.sampled_from(self.sources))
        if mutation is not None or draw(st.integers(0, 3)) == 0:
            mutation = mutation or draw(st.sampled_from(sorted(RAW_MUTATIONS)))
            return Case(f"raw:{mutation}", RAW_MUTATIONS[mutation](data, draw), None, source)
        return Case(op.op_id, data, op, source)

    # --- judging --------------------------------------------------------------------------

    def send(self, case: Case) -> Answer:
        self.report.requests += 1
        self.report.by_label[case.label] += 1
        try:
            answer = exchange(self.host, self.port, case.data, case.source)
        except OSError as e:
            answer = Answer(None, {}, repr(e).encode())
        self.report.by_status[answer.status] += 1
        self._judge(case, answer)
        return answer

    def _judge(self, case: Case, answer: Answer) -> None:
        status = answer.status
        what = (case.label, case.data[:300], status, answer.body[:300])
        if status is not None and status >= 500:
            self.report.server_errors.append(what)
        state = self.snapshot()
        if status is None or not 200 <= status < 300:
            if state != self._state:
                self.report.state_changes.append(what)
        self._state = state
        if status is None:
            if case.op is not None:
                self.report.spec_violations.append((*what, "no answer to a well-framed request"))
            return
        error = self._error_of(answer)
        if status >= 400 and error is None and case.data.lstrip(b"\r\n")[:4] != b"HEAD":  # HEAD: no body
            self.report.spec_violations.append((*what, "a refusal without a JSON error"))
            return
        if case.op is None or (error is not None and error.get("code") in SERVER_CODES.get(status, ())):
            return  # the server's own refusal: any path
        self._check_documented(case, answer, what)

    @staticmethod
    def _error_of(answer: Answer) -> dict | None:
        if "json" not in answer.headers.get("content-type", ""):
            return None
        try:
            body = json.loads(answer.body)
        except ValueError:
            return None
        error = body.get("error") if isinstance(body, dict) else None
        return error if isinstance(error, dict) and isinstance(error.get("code"), str) else None

    def _check_documented(self, case: Case, answer: Answer, what: tuple) -> None:
        op = case.op
        assert op is not None
        method = case.data.split(b" ", 1)[0].decode()
        if method != op.method:
            if answer.status not in (404, 405, 200, 302):  # another method on the same path
                self.report.spec_violations.append((*what, f"{method} answered {answer.status}"))
            return
        spec = op.responses.get(str(answer.status))
        if spec is None:
            self.report.spec_violations.append((*what, f"status {answer.status} not documented for {op.op_id}"))
            return
        for ctype, media in spec.get("content", {}).items():
            schema = media.get("schema")
            if schema is None or "json" not in ctype or method == "HEAD":
                continue
            try:
                value = json.loads(answer.body)
            except ValueError:
                self.report.spec_violations.append((*what, "body is not JSON"))
                return
            errors = sorted(e.message for e in self._validator(schema).iter_errors(value))
            if errors:
                self.report.spec_violations.append((*what, f"schema: {errors[:3]}"))

    def _validator(self, schema: dict) -> Draft202012Validator:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._validators:
            registry = Registry().with_resource("urn:spec", Resource.from_contents(self.spec, DRAFT202012))
            self._validators[key] = Draft202012Validator(copy.deepcopy(schema), registry=registry)
        return self._validators[key]

    def alive(self) -> bool:
        try:
            return exchange(self.host, self.port, b"GET /api/offer HTTP/1.1\r\nHost: x\r\n\r\n").status == 200
        except OSError:
            return False

    # --- running --------------------------------------------------------------------------

    def run(self, n: int, seed: int | None = None, check_every: int = 200, each_mutation: int = 3) -> Report:
        """At least `n` requests (hypothesis examples); then `each_mutation` more of every framing
        mutation the run drew fewer times (hypothesis' choices are not uniform: a short run may
        miss one); then a last check that the server is up."""

        def examples(count: int, strategy: st.SearchStrategy) -> None:
            @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
                      derandomize=seed is not None, suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def one(case: Case) -> None:
                self.send(case)
                if self.report.requests % check_every == 0 and not self.alive():
                    self.report.dead = f"no answer after request {self.report.requests} ({case.label})"
                    raise _Dead

            start = self.report.requests
            while self.report.requests - start < count and not self.report.dead:
                try:
                    one()
                except _Dead:
                    break

        examples(n, self.cases())
        for mutation in sorted(RAW_MUTATIONS):
            missing = each_mutation - self.report.by_label[f"raw:{mutation}"]
            if missing > 0 and not self.report.dead:
                examples(missing, self.cases(mutation))
        if not self.report.dead and not self.alive():
            self.report.dead = "no answer at the end"
        return self.report


class _Dead(Exception):
    pass


def _chunk(body: bytes, size: int) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


# --- framing broken on purpose --------------------------------------------------------------------

def _split(data: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def _join(lines: list[bytes], body: bytes) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _set_header(lines: list[bytes], name: bytes, value: bytes | None) -> list[bytes]:
    kept = [line for line in lines if not line.lower().startswith(name.lower() + b":")]
    return kept if value is None else [*kept, name + b": " + value]


_garbage = st.binary(min_size=1, max_size=40)
_text = st.text(min_size=1, max_size=20).map(lambda t: t.encode("utf-8"))


def _bad_length(data, draw):
    lines, body = _split(data)
    value = draw(st.one_of(st.sampled_from([b"abc", b"-1", b"+5", b"0x10", b"1e3", b"99999999999999999999999",
                                            b"5, 6", b" ", b"", b"\xff"]), _text))
    lines = _set_header(_set_header(lines, b"Transfer-Encoding", None), b"Content-Length", value)
    return _join(lines, body)


def _length_mismatch(data, draw):
    lines, body = _split(data)
    if b"transfer-encoding" in data.lower():
        body = _unchunk(body)
    delta = draw(st.sampled_from([-5, -1, 1, 7, 100]))
    lines = _set_header(_set_header(lines, b"Transfer-Encoding", None), b"Content-Length",
                        str(max(0, len(body) + delta)).encode())
    return _join(lines, body)


def _two_lengths(data, draw):
    lines, body = _split(data)
    return _join([*lines, b"Content-Length: 1", b"Content-Length: %d" % (len(body) + 2)], body)


def _length_and_chunked(data, draw):
    lines, body = _split(data)
    lines = _set_header(_set_header(lines, b"Transfer-Encoding", b"chunked"), b"Content-Length", b"%d" % len(body))
    return _join(lines, body)


def _bad_coding(data, draw):
    lines, body = _split(data)
    value = draw(st.one_of(st.sampled_from([b"gzip", b"chunked, gzip", b"gzip, chunked", b"identity",
                                            b"chunked, chunked", b"xchunked", b""]), _text))
    return _join(_set_header(_set_header(lines, b"Content-Length", None), b"Transfer-Encoding", value), body)


def _bad_chunks(data, draw):
    lines, body = _split(data)
    if b"transfer-encoding" in data.lower():
        body = _unchunk(body)
    lines = _set_header(_set_header(lines, b"Content-Length", None), b"Transfer-Encoding", b"chunked")
    size = b"%x" % len(body)
    bad = draw(st.sampled_from(["hex", "short", "long", "nocrlf", "overflow", "ext", "noend", "negative", "garbage",
                                "huge", "trailer"]))
    chunked = {
        "hex": b"zz\r\n" + body + b"\r\n0\r\n\r\n",
        "short": size + b"\r\n" + body[:-1] + b"\r\n0\r\n\r\n",
        "long": size + b"\r\n" + body + b"xyz\r\n0\r\n\r\n",
        "nocrlf": size + b"\r\n" + body + b"0\r\n\r\n",
        "overflow": b"f" * 40 + b"\r\n" + body + b"\r\n0\r\n\r\n",
        "ext": size + b";" + draw(_garbage).replace(b"\n", b"") + b"\r\n" + body + b"\r\n0\r\n\r\n",
        "noend": size + b"\r\n" + body + b"\r\n",
        "negative": b"-" + size + b"\r\n" + body + b"\r\n0\r\n\r\n",
        "garbage": draw(_garbage),
        "huge": b"4000000\r\n" + body,
        "trailer": size + b"\r\n" + body + b"\r\n0\r\n" + draw(_garbage).replace(b"\r\n\r\n", b"") + b"\r\n\r\n",
    }[bad]
    return _join(lines, chunked)


def _bad_request_line(data, draw):
    lines, body = _split(data)
    method, target, version = (lines[0].split(b" ", 2) + [b"", b""])[:3]
    which = draw(st.sampled_from(["method", "target", "version", "spaces", "whole"]))
    if which == "method":
        method = draw(st.one_of(st.sampled_from([b"", b"G ET", b"GET\x00", b"\xff\xfe", b"get"]), _text))
    elif which == "target":
        target = draw(st.one_of(st.sampled_from([b"", b"/a b", b"/\x00", b"/%ff%fe", b"/%", b"*", b"http://x",
                                                 b"http://h:1/api/offer", b"//", b"/" + b"a" * 9000]), _garbage))
    elif which == "version":
        version = draw(st.one_of(st.sampled_from([b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/1.1x", b"http/1.1",
                                                  b""]), _text))
    elif which == "spaces":
        return _join([method + b"  " + target + b" " + version, *lines[1:]], body)
    else:
        return _join([draw(_garbage), *lines[1:]], body)
    return _join([method + b" " + target + b" " + version, *lines[1:]], body)


def _bad_header(data, draw):
    lines, body = _split(data)
    bad = draw(st.one_of(st.sampled_from([b" folded: value", b"\tfolded", b"No-Colon", b"Bad Name: x", b": empty",
                                          b"X: a\x00b", b"X: a\rb", b"Host: second", b"X-" + b"a" * 20000 + b": 1",
                                          b"Expect: something", b"Expect: 100-continue", b"Connection: keep-alive"]),
                         _garbage.map(lambda g: g.replace(b"\r\n", b""))))
    at = draw(st.integers(1, len(lines)))
    return _join([*lines[:at], bad, *lines[at:]], body)


def _many_headers(data, draw):
    lines, body = _split(data)
    n = draw(st.sampled_from([65, 200, 2000]))
    return _join([*lines, *(b"X-%d: %d" % (i, i) for i in range(n))], body)


def _truncated(data, draw):
    return data[:draw(st.integers(0, max(0, len(data) - 1)))]


def _line_endings(data, draw):
    return data.replace(b"\r\n", draw(st.sampled_from([b"\n", b"\r", b"\n\r"])))


def _leading_blank_lines(data, draw):
    return b"\r\n" * draw(st.integers(1, 5)) + data


def _garbage_request(data, draw):
    return draw(st.binary(min_size=0, max_size=2000))


def _unchunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, rest = out + rest[:n], rest[n + 2:]
    return out


RAW_MUTATIONS: dict[str, Callable] = {
    "bad_length": _bad_length, "length_mismatch": _length_mismatch, "two_lengths": _two_lengths,
    "length_and_chunked": _length_and_chunked, "bad_coding": _bad_coding, "bad_chunks": _bad_chunks,
    "bad_request_line": _bad_request_line, "bad_header": _bad_header, "many_headers": _many_headers,
    "truncated": _truncated, "line_endings": _line_endings, "leading_blank_lines": _leading_blank_lines,
    "garbage": _garbage_request,
}


def loopback_sources(n: int = 200) -> list[str]:
    """Source addresses for the fuzz's connections (any 127/8 address is this host's)."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


def state_of(hotspot) -> Callable[[], object]:
    """What a refused request must not change: every file of the state_dir, byte for byte, and
    the manager's channels (unfunded opens live in memory only)."""

    def snapshot() -> object:
        files = {str(p): p.read_bytes() for p in sorted(hotspot.state_dir.rglob("*")) if p.is_file()}
        return files, sorted(((ch.id, ch) for ch in hotspot.manager.channels()), key=lambda kv: kv[0])

    return snapshot


def fuzz_rig(hotspot) -> PortalFuzz:
    """A fuzzer against `hotspot` (tests/support/hotspot.py) whose portal is served with every
    per-client limit on, loopback included (connections come from 200 loopback addresses), and
    pools of valid values: keys, refund addresses, an unfunded and a funded, paid channel and
    its funding transaction."""
    from bitmesh.portal.api import OpenLimit, make_app
    from bitmesh.portal.httpserver import HttpServer, Limits
    from tests.support.coins import key_address, new_key

    hotspot.http.stop()
    app = make_app(hotspot.manager, "test-node", open_limit=OpenLimit(exempt_loopback=False))
    hotspot.http = HttpServer(app, [("127.0.0.1", 0)], Limits(exempt_loopback=False))
    hotspot.http.start()
    unfunded = hotspot.open_payer(40_000)
    funded = hotspot.funded_payer(40_000)
    funded.pay_exact(2_000)
    funding = hotspot.manager.get(funded.channel_id or "").funding
    assert funding is not None
    raw = hotspot.node.rpc("getrawtransaction", funding.txid, 0)
    pools = Pools(pubkeys=[bytes(new_key().pub).hex() for _ in range(4)],
                  addresses=[key_address(new_key()) for _ in range(4)],
                  channel_ids=[unfunded.channel_id or "", funded.channel_id or ""],
                  txs=[raw if isinstance(raw, str) else raw.get("hex", "")], txids=[funding.txid],
                  proofs=[payer.proof(action) for payer in (unfunded, funded) for action in ("session", "close")
                          if hasattr(payer, "proof")])
    return PortalFuzz("127.0.0.1", hotspot.http.port, pools, state_of(hotspot), sources=loopback_sources())
