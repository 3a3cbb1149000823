"""A DNS tunnel as iodine and dnscat build one, for tests and the bench: an authoritative server
for a zone in the upstream namespace and a tunnel client in a client namespace.

Up: the client puts data into long random-looking names (base32 labels, up to 253 octets) under
`<seq>.<session>.t.<zone>`; every resolver on the way forwards them to the zone's server, which
decodes them. Down: the server answers with as much data as the answer may carry (TXT strings,
one NULL record, or A records), as iodine does. Both payloads are derived from (session, seq),
so each side counts only bytes that it checked: up is what the authoritative server decoded
(data that left the hotspot), down what the client decoded from answers.

The server also serves ordinary names from a JSON records file re-read when it changes
({"name": {"A": [...], "AAAA": [...]}}; "*.name" matches anything below name), for paid clients
and walled-garden names.

Self-contained (standard library only): run as a script inside a namespace,
`python tests/support/dns.py server|tunnel|resolve|latency '<json kwargs>'`; the host-side
helpers at the bottom do that through a Topology.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "NULL": 10, "PTR": 12, "TXT": 16, "AAAA": 28, "OPT": 41}
NAMES = {v: k for k, v in TYPES.items()}
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, REFUSED = 0, 1, 2, 3, 5
TUNNEL_LABEL = "t"  # tunnel names live under t.<zone>
MAX_NAME = 253

# -- wire format ------------------------------------------------------------------------------


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            if len(raw) > 63:
                raise ValueError(f"label too long: {label[:20]}...")
            out += bytes([len(raw)]) + raw
    return out + b"\0"


def _read_name(data: bytes, off: int) -> tuple[str, int]:
    labels: list[str] = []
    end = None
    for _ in range(128):  # bounded: compression loops
        n = data[off]
        if n & 0xC0 == 0xC0:
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | data[off + 1]
            continue
        if n == 0:
            return ".".join(labels), (end if end is not None else off + 1)
        labels.append(data[off + 1:off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    raise ValueError("name compression loop")


def build_query(qid: int, name: str, qtype: str | int, edns: int | None = 4096, rd: bool = True) -> bytes:
    t = TYPES[qtype] if isinstance(qtype, str) else qtype
    flags = 0x0100 if rd else 0
    msg = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
    msg += encode_name(name) + struct.pack("!HH", t, 1)
    if edns:
        msg += b"\0" + struct.pack("!HHIH", TYPES["OPT"], edns, 0, 0)
    return msg


def parse(data: bytes) -> dict:
    """A DNS message: id, flags, rcode, tc, the first question, answer records and the EDNS size."""
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", data[:12])
    off = 12
    qname, qtype = "", 0
    for i in range(qd):
        name, off = _read_name(data, off)
        t, _cls = struct.unpack("!HH", data[off:off + 4])
        off += 4
        if i == 0:
            qname, qtype = name, t
    records = []
    edns = None
    for section in range(an + ns + ar):
        name, off = _read_name(data, off)
        t, cls, ttl, rdlen = struct.unpack("!HHIH", data[off:off + 10])
        off += 10
        rdata = data[off:off + rdlen]
        if len(rdata) != rdlen:
            raise ValueError("truncated record")
        off += rdlen
        if t == TYPES["OPT"]:
            edns = cls
        elif section < an:
            records.append((name, t, ttl, rdata))
    return {"id": qid, "qr": bool(flags & 0x8000), "tc": bool(flags & 0x0200), "rcode": flags & 0xF,
            "qname": qname, "qtype": qtype, "answers": records, "edns": edns}


def build_response(query: dict, answers: list[tuple[int, bytes]], rcode: int = NOERROR, ttl: int = 0,
                   tc: bool = False) -> bytes:
    """An authoritative answer to `query`; each answer is (type, rdata) for the question's name."""
    flags = 0x8000 | 0x0400 | 0x0100 | rcode | (0x0200 if tc else 0)  # QR, AA, RD echoed
    ar = 1 if query["edns"] else 0
    msg = struct.pack("!HHHHHH", query["id"], flags, 1, len(answers), 0, ar)
    msg += encode_name(query["qname"]) + struct.pack("!HH", query["qtype"], 1)
    for t, rdata in answers:
        msg += b"\xc0\x0c" + struct.pack("!HHIH", t, 1, ttl, len(rdata)) + rdata
    if ar:
        msg += b"\0" + struct.pack("!HHIH", TYPES["OPT"], 4096, 0, 0)
    return msg


def rdata_text(t: int, rdata: bytes) -> str:
    if t == TYPES["A"]:
        return str(ipaddress.IPv4Address(rdata))
    if t == TYPES["AAAA"]:
        return str(ipaddress.IPv6Address(rdata))
    return rdata.hex()


# -- the tunnel's payloads ----------------------------------------------------------------------


def stream(*parts: object, n: int) -> bytes:
    """n deterministic pseudo-random bytes for (parts): both ends can check what they got."""
    seed = ":".join(map(str, parts)).encode()
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + b"#%d" % i).digest()
        i += 1
    return out[:n]


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _unb32(text: str) -> bytes:
    text = text.upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def tunnel_name(sid: str, seq: int, zone: str, max_name: int = MAX_NAME) -> tuple[str, int]:
    """The longest name carrying up-data for (sid, seq) under t.<zone>: (name, data bytes)."""
    suffix = f".{seq:x}.{sid}.{TUNNEL_LABEL}.{zone}"
    room = max_name - len(suffix)
    chars = room - room // 64  # one dot per 63-character label
    n = chars * 5 // 8
    while True:
        text = _b32(stream(sid, seq, "up", n=n))
        labels = [text[i:i + 63] for i in range(0, len(text), 63)]
        name = ".".join(labels) + suffix
        if len(name) <= max_name:
            return name, n
        n -= 1


def _parse_tunnel(qname: str, zone: str) -> tuple[str, int, bytes] | None:
    suffix = f".{TUNNEL_LABEL}.{zone}"
    if not qname.lower().endswith(suffix):
        return None
    labels = qname[: -len(suffix)].split(".")
    if len(labels) < 3:
        return None
    try:
        sid, seq, data = labels[-1].lower(), int(labels[-2], 16), _unb32("".join(labels[:-2]))
    except ValueError:
        return None
    return sid, seq, data


def down_payload(query: dict, sid: str, seq: int, limit: int) -> tuple[list[tuple[int, bytes]], int]:
    """Answers filling a message of `limit` bytes with down-data: (records, data bytes)."""
    fixed = 12 + len(encode_name(query["qname"])) + 4 + (11 if query["edns"] else 0)
    room = limit - fixed - 12  # one record's name pointer, type, class, ttl, rdlength
    qtype = query["qtype"]
    if qtype == TYPES["TXT"]:
        n = room - (room + 255) // 256  # one length octet per string of up to 255
        data = stream(sid, seq, "down", n=max(0, n))
        rdata = b"".join(bytes([len(data[i:i + 255])]) + data[i:i + 255] for i in range(0, len(data), 255))
        return [(qtype, rdata)], len(data)
    if qtype == TYPES["NULL"]:
        data = stream(sid, seq, "down", n=max(0, min(room, 65535)))
        return [(qtype, data)], len(data)
    if qtype == TYPES["A"]:
        k = max(0, (limit - fixed) // 16)
        data = stream(sid, seq, "down", n=4 * k)
        return [(qtype, data[i:i + 4]) for i in range(0, len(data), 4)], len(data)
    return [], 0


def decode_down(qtype: int, records: list[tuple[str, int, int, bytes]]) -> bytes:
    if qtype == TYPES["TXT"]:
        out = b""
        for _, t, _, rdata in records:
            if t != qtype:
                continue
            i = 0
            while i < len(rdata):
                n = rdata[i]
                out += rdata[i + 1:i + 1 + n]
                i += 1 + n
        return out
    return b"".join(rdata for _, t, _, rdata in records if t == qtype)


# -- the authoritative server ------------------------------------------------------------------


class Server:
    def __init__(self, zone: str, records: str | None, stats: str | None, ttl: int = 0):
        self.zone = zone.strip(".").lower()
        self.records_path = records
        self.stats_path = stats
        self.ttl = ttl
        self._records: dict = {}
        self._mtime = None
        self.sessions: dict[str, dict[str, int]] = {}
        self.queries = 0
        self._lock = threading.Lock()
        self._dirty = False

    def records(self) -> dict:
        if self.records_path:
            try:
                mtime = os.stat(self.records_path).st_mtime_ns
            except OSError:
                return self._records
            if mtime != self._mtime:
                self._mtime = mtime
                with open(self.records_path) as f:
                    self._records = {k.lower().strip("."): v for k, v in json.load(f).items()}
        return self._records

    def lookup(self, qname: str) -> dict | None:
        recs = self.records()
        name = qname.lower().strip(".")
        if name in recs:
            return recs[name]
        parts = name.split(".")
        for i in range(1, len(parts)):
            wild = "*." + ".".join(parts[i:])
            if wild in recs:
                return recs[wild]
        return None

    def answer(self, data: bytes, limit: int) -> bytes | None:
        try:
            q = parse(data)
        except (ValueError, IndexError, struct.error):
            return None
        if q["qr"] or not q["qname"]:
            return None
        with self._lock:
            self.queries += 1
        if q["edns"]:
            limit = min(limit, max(512, q["edns"]))
        tun = _parse_tunnel(q["qname"], self.zone)
        if tun is not None:
            sid, seq, data_up = tun
            good = data_up == stream(sid, seq, "up", n=len(data_up))
            answers, n_down = down_payload(q, sid, seq, limit)
            with self._lock:
                s = self.sessions.setdefault(sid, {"up_bytes": 0, "down_bytes": 0, "queries": 0, "bad": 0})
                s["queries"] += 1
                if good:
                    s["up_bytes"] += len(data_up)
                else:
                    s["bad"] += 1
                s["down_bytes"] += n_down
                self._dirty = True
            return build_response(q, answers, ttl=0)
        rec = self.lookup(q["qname"])
        if rec is None:
            return build_response(q, [], NXDOMAIN, ttl=self.ttl)
        t = NAMES.get(q["qtype"], "")
        out = []
        for value in rec.get(t, []):
            if t in ("A", "AAAA"):
                out.append((q["qtype"], ipaddress.ip_address(value).packed))
            elif t == "TXT":
                raw = value.encode()
                out.append((q["qtype"], bytes([len(raw)]) + raw))
        return build_response(q, out, ttl=self.ttl)

    def write_stats(self) -> None:
        if not self.stats_path:
            return
        with self._lock:
            body = json.dumps({"queries": self.queries, "sessions": self.sessions})
            self._dirty = False
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, self.stats_path)

    def serve(self, port: int) -> None:
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.bind(("::", port))
        tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("::", port))
        tcp.listen(64)
        threading.Thread(target=self._tcp, args=(tcp,), daemon=True).start()
        threading.Thread(target=self._stats_loop, daemon=True).start()
        self.write_stats()
        print("READY", flush=True)
        while True:
            data, addr = udp.recvfrom(65535)
            reply = self.answer(data, 4096)
            if reply is not None:
                udp.sendto(reply, addr)

    def _stats_loop(self) -> None:
        while True:
            time.sleep(0.05)
            if self._dirty:
                self.write_stats()

    def _tcp(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while True:
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                data = _recv_exact(conn, struct.unpack("!H", head)[0])
                if data is None:
                    return
                reply = self.answer(data, 65535)
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            pass
        finally:
            conn.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# -- clients ------------------------------------------------------------------------------------


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tunnel(server: str, zone: str, seconds: float = 5.0, qtype: str = "TXT", window: int = 16,
           sid: str | None = None, sources: list[str] | None = None, port: int = 53, timeout: float = 0.5,
           edns: int = 4096) -> dict:
    """Push data up and pull data down through the resolver at `server` for `seconds`, keeping
    `window` queries in flight (iodine's lazy mode); queries go out round-robin from `sources`
    (local addresses; default: the routing's choice). Counts only checked down-data."""
    sid = sid or f"{random.getrandbits(32):08x}"
    t = TYPES[qtype]
    socks = []
    for src in sources or [None]:
        s = socket.socket(_family(server), socket.SOCK_DGRAM)
        if src:
            s.bind((src, 0))
        s.setblocking(False)
        socks.append(s)
    pending: dict[tuple[int, int], tuple[int, float]] = {}  # (sock index, qid) -> (seq, sent at)
    seq = queries = answers = up_sent = down = bad = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        for key, (_, sent) in list(pending.items()):
            if now - sent > timeout:
                del pending[key]
        if now >= end and not pending:
            break
        while now < end and len(pending) < window:
            i = seq % len(socks)
            name, n = tunnel_name(sid, seq, zone)
            qid = random.getrandbits(16)
            try:
                socks[i].sendto(build_query(qid, name, t, edns=edns), (server, port))
            except OSError:
                break
            pending[(i, qid)] = (seq, now)
            seq += 1
            queries += 1
            up_sent += n
        ready, _, _ = select.select(socks, [], [], 0.05)
        for s in ready:
            i = socks.index(s)
            while True:
                try:
                    data = s.recv(65535)
                except OSError:
                    break
                try:
                    msg = parse(data)
                except (ValueError, IndexError, struct.error):
                    bad += 1
                    continue
                entry = pending.pop((i, msg["id"]), None)
                if entry is None:
                    continue
                answers += 1
                got = decode_down(t, msg["answers"])
                if got and got == stream(sid, entry[0], "down", n=len(got)):
                    down += len(got)
                elif got:
                    bad += 1
    for s in socks:
        s.close()
    took = time.monotonic() - start
    return {"sid": sid, "queries": queries, "answers": answers, "up_sent": up_sent, "down_bytes": down,
            "bad": bad, "seconds": took}


def resolve(name: str, qtype: str = "A", server: str = "10.77.1.1", port: int = 53, timeout: float = 2.0,
            tcp: bool = False, edns: int | None = 1232) -> dict:
    """One query; {"rcode", "answers": [text], "tc"} or {"error"} when nothing came back."""
    q = build_query(random.getrandbits(16), name, qtype, edns=edns)
    try:
        if tcp:
            with socket.create_connection((server, port), timeout=timeout) as s:
                s.sendall(struct.pack("!H", len(q)) + q)
                head = _recv_exact(s, 2)
                data = _recv_exact(s, struct.unpack("!H", head)[0]) if head else None
                if data is None:
                    return {"error": "closed"}
        else:
            with socket.socket(_family(server), socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(q, (server, port))
                data = s.recv(65535)
    except OSError as e:
        return {"error": repr(e)}
    msg = parse(data)
    return {"rcode": msg["rcode"], "tc": msg["tc"],
            "answers": [rdata_text(t, rd) for _, t, _, rd in msg["answers"] if t == TYPES.get(qtype)],
            "types": sorted({NAMES.get(t, str(t)) for _, t, _, _ in msg["answers"]})}


def latency(names: list[str], qtype: str = "A", server: str = "10.77.1.1", port: int = 53,
            timeout: float = 2.0) -> dict:
    """Milliseconds per query, one after the other (failures as null)."""
    out = []
    for name in names:
        t0 = time.perf_counter()
        r = resolve(name, qtype, server, port, timeout)
        ok = "error" not in r and r["rcode"] == NOERROR and r["answers"]
        out.append((time.perf_counter() - t0) * 1000 if ok else None)
    return {"ms": out}


def main(argv: list[str]) -> None:
    cmd, kwargs = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    if cmd == "server":
        Server(kwargs["zone"], kwargs.get("records"), kwargs.get("stats"), kwargs.get("ttl", 0)).serve(
            kwargs.get("port", 53))
    else:
        print(json.dumps({"tunnel": tunnel, "resolve": resolve, "latency": latency}[cmd](**kwargs)))


# -- host side: through a Topology ----------------------------------------------------------------

SCRIPT = Path(__file__).resolve()
ZONE = "tunnel.test"


class ZoneServer:
    """The authoritative server for `zone` in a namespace (normally upstream), on port 53."""

    def __init__(self, topo, ns: str, workdir: Path, zone: str = ZONE, records: dict | None = None, ttl: int = 0):
        self.zone = zone
        self.records_path = workdir / "records.json"
        self.stats_path = workdir / "stats.json"
        self.set_records(records or {})
        self.proc = topo.spawn(ns, sys.executable, str(SCRIPT), "server", json.dumps(
            {"zone": zone, "records": str(self.records_path), "stats": str(self.stats_path), "ttl": ttl}))

    def set_records(self, records: dict) -> None:
        tmp = self.records_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, self.records_path)

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def session(self, sid: str) -> dict:
        """What the server got and sent for one tunnel session (zeros if nothing arrived)."""
        time.sleep(0.15)  # the server writes its figures every 50 ms
        return self.stats()["sessions"].get(sid, {"up_bytes": 0, "down_bytes": 0, "queries": 0, "bad": 0})


def run(topo, ns: str, cmd: str, limit: float = 120.0, **kwargs) -> dict:
    """`cmd(**kwargs)` of this module run inside `ns` (at most `limit` seconds)."""
    from tests.support.netns import run_in

    p = run_in(ns, sys.executable, str(SCRIPT), cmd, json.dumps(kwargs), timeout=limit)
    return json.loads(p.stdout)


def measure_tunnel(topo, ns: str, server: ZoneServer, resolver: str, seconds: float = 5.0, **kwargs) -> dict:
    """A tunnel session from `ns` through `resolver`: up = bytes/s the authoritative server
    decoded (what left the hotspot), down = checked bytes/s the client decoded."""
    got = run(topo, ns, "tunnel", server=resolver, zone=server.zone, seconds=seconds,
              limit=seconds + 60, **kwargs)
    at_server = server.session(got["sid"])
    took = max(got["seconds"], 1e-6)
    return {**got, "up_bytes": at_server["up_bytes"], "server_queries": at_server["queries"],
            "up_bytes_per_s": at_server["up_bytes"] / took, "down_bytes_per_s": got["down_bytes"] / took}


if __name__ == "__main__":
    main(sys.argv[1:])
