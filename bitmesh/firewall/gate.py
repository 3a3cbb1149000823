"""Gate: the service's handle on `table inet bitmesh`.

Every change is one atomic `nft -f` batch; every read is one `nft -j list table` call covering
all clients (no process per client), except a payment's quota raise, which reads that one quota
and raises its limit in place, and an IPv6 sync pass, one read and one batch for all devices.
The kernel enforces quotas and expiry by itself, so the caller only polls `usage()` at a modest
interval or after events, to bill and to notice ends.

Used bytes survive every replace: on nft 1.0.6 there is no `reset element`, and a quota object
or a set element cannot be changed in place portably, so a replace reads the live counters
first and writes them back into the new element (`counter packets 0 bytes N`) and the new quota
object (`used N`) within the same batch that removes the old ones.

The table can vanish under us: `/etc/init.d/firewall stop` runs `fw4 flush`, which deletes every
table (`nft delete table` for each line of `nft list tables`), and so do `nft flush ruleset` and a
plain `nft delete table inet bitmesh`. Without the table every client passes (fail-open). Once
loaded, the gate puts it back by itself, atomically, with every paid client's grant and the bytes
last counted for it: at once when `TableWatch` (`nft -j monitor tables`) reports the deletion, and
at the latest on the meter's next read or the next grant, which find the table missing.

A paid device's IPv6 addresses change (SLAAC, privacy addresses): besides the addresses its grant
names, `sync_addresses` grants the global IPv6 addresses the kernel's neighbour table binds to its
MAC and removes them when the table no longer does. Elements of a removed address take their
counted bytes with them; the gate keeps those bytes per device (`_retired`), so what a device
used never goes down.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from bitmesh.firewall.nft import Nft
from bitmesh.firewall.ruleset import (
    FAMILY,
    TABLE,
    ClientAddressError,
    ClientElements,
    FirewallConfig,
    FirewallError,
    PaidClient,
    UnknownClient,
    address_elements,
    check_clients,
    client_elements,
    dns_uncut,
    normalize_mac,
    quota_name,
    render,
    render_delete,
    timeout_ms,
)

log = logging.getLogger(__name__)

MAX_LEARNED = 16  # IPv6 addresses granted to one device besides its own (its neighbour entries)


@dataclass(frozen=True)
class ClientUsage:
    bytes_up: int
    bytes_down: int
    expired: bool = False  # time tariff over, or the kernel no longer holds the client
    exhausted: bool = False  # the kernel quota is used up: traffic is being dropped

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down


@dataclass
class _State:
    """What `nft -j list table inet bitmesh` says, indexed."""

    up: dict[tuple[str, str], int]  # (mac, ip) -> accepted upload bytes (paid4 + paid6)
    down: dict[str, int]  # ip -> accepted download bytes (down4 + down6)
    maps: dict[str, set]  # quota map name -> keys present
    quotas: dict[str, tuple[int, int]]  # quota name -> (limit, used)
    exists: bool = True
    macs: set[str] = field(default_factory=set)  # paid_macs
    seen6: set[tuple[str, str]] = field(default_factory=set)  # (mac, ipv6) of paid devices, not granted


def _norm(x):
    if isinstance(x, str):
        try:
            x = str(ipaddress.ip_address(x))
        except ValueError:
            x = x.lower()
        # one string per address, however many sets and maps name it (the same as the last read's)
        return sys.intern(x)
    return x


class _Elem:
    """A set element with its counter, as `_compact` keeps it: its key and its byte count."""

    __slots__ = ("key", "bytes")

    def __init__(self, key, counted: int):
        self.key = key
        self.bytes = counted


def _key(v):
    if isinstance(v, _Elem):
        return v.key
    if isinstance(v, dict):
        if "elem" in v:
            return _key(v["elem"]["val"])
        if "concat" in v:
            return tuple(_norm(x) for x in v["concat"])
    return _norm(v)


def _counter_bytes(v) -> int:
    if isinstance(v, _Elem):
        return v.bytes
    if isinstance(v, dict) and "elem" in v:
        return int((v["elem"].get("counter") or {}).get("bytes", 0))
    return 0


_DROPPED: dict = {}  # what `_compact` leaves of a chain or a rule: parse_state skips it


def _compact(obj: dict):
    """json's object_hook for the table read: each object as `parse_state` needs it, made while
    parsing (innermost first), so the whole listing never exists as dicts: an element with its
    counter becomes an `_Elem`, a concatenation its normalised key, a chain or rule nothing.
    With 200 clients the parse peaks at about half of plain json.loads's 1.6 MB."""
    if "val" in obj:  # {"val": ..., "counter": {...}, "timeout": ..., "expires": ...}
        counter = obj.get("counter")
        return _Elem(_key(obj["val"]), int(counter.get("bytes", 0)) if isinstance(counter, dict) else 0)
    if len(obj) == 1:
        if "concat" in obj:
            return tuple(_key(x) for x in obj["concat"])
        if isinstance(obj.get("elem"), _Elem):
            return obj["elem"]
        if "rule" in obj or "chain" in obj:
            return _DROPPED
    return obj


def parse_state(objs: list[dict]) -> _State:
    st = _State(up={}, down={}, maps={}, quotas={})
    for o in objs:
        if "quota" in o:
            q = o["quota"]
            st.quotas[q["name"]] = (int(q.get("bytes", 0)), int(q.get("used", 0)))
        elif "set" in o:
            s = o["set"]
            for e in s.get("elem", []) or []:
                k = _key(e)
                if s["name"] in ("paid4", "paid6"):
                    st.up[k] = st.up.get(k, 0) + _counter_bytes(e)
                elif s["name"] in ("down4", "down6"):
                    st.down[k] = st.down.get(k, 0) + _counter_bytes(e)
                elif s["name"] == "paid_macs":
                    st.macs.add(k)
                elif s["name"] == "seen6" and isinstance(k, tuple):
                    st.seen6.add(k)
        elif "map" in o:
            m = o["map"]
            keys = st.maps.setdefault(m["name"], set())
            for e in m.get("elem", []) or []:
                keys.add(_key(e[0] if isinstance(e, list) else e))
    return st


def is_global6(address: str) -> bool:
    """An IPv6 address a device may use through the router (not link-local, multicast, ...)."""
    try:
        a = ipaddress.ip_address(address)
    except ValueError:
        return False
    return a.version == 6 and not (a.is_link_local or a.is_multicast or a.is_loopback or a.is_unspecified)


def learned_ipv6(mac: str, current: Iterable[str], table: dict[str, str], taken: set[str]) -> list[str]:
    """The IPv6 addresses a paid device gets besides its own: the global ones the neighbour table
    (`table`: address -> MAC) binds to its MAC, none that is another device's own (`taken`), at
    most MAX_LEARNED, those it has already first (so a flood of new ones cannot push them out)."""
    mine = [a for a, m in table.items() if m == mac and a not in taken and is_global6(a)]
    held = [a for a in current if a in mine]
    return (held + sorted(a for a in mine if a not in held))[:MAX_LEARNED]


class Gate:
    """Drive `table inet bitmesh`. Thread-safe; all methods block for one or two `nft` runs."""

    def __init__(self, config: FirewallConfig, nft: Nft | None = None, clock: Callable[[], float] = time.time):
        config.validate()
        self.config = config
        self.nft = nft or Nft()
        self.clock = clock
        self._clients: dict[str, PaidClient] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # last (up, down) observed per MAC
        self._own: dict[str, tuple[str, ...]] = {}  # the addresses each grant names (not learned)
        self._retired: dict[str, tuple[int, int]] = {}  # bytes counted on elements since removed
        self._last: _State | None = None  # the last read, for sync_addresses' candidates
        self._frozen: dict[str, int] = {}  # MAC -> its byte allowance, held back while a close reads (freeze)
        self._lock = threading.RLock()
        self._loaded = False  # start()/reload() put the table in and stop() has not removed it
        self._watch: TableWatch | None = None
        self.restores = 0  # times the table was found missing and put back

    # -- whole table ------------------------------------------------------------------------

    def start(self, clients: Iterable[PaidClient] = ()) -> None:
        """Load the whole table atomically (replacing any left over from a previous run) with
        every paid client the ledger knows, their used bytes carried into counters and quotas."""
        with self._lock:
            leftover = self._read()
            given = check_clients(clients)
            own = {a for c in given for a in c.addresses}
            cl = [self._leftover_counts(c, leftover, own) for c in given]
            self.nft.load(render(self.config, cl, self.clock()))
            self._set_all(cl, {c.mac: c.addresses for c in given})
            self._loaded = True

    def reload(self, config: FirewallConfig | None = None, clients: Iterable[PaidClient] | None = None) -> None:
        """Atomically replace the table with a new config and/or client list. Bytes the kernel
        counted for a client since its last report are kept (the larger of kernel and caller)."""
        with self._lock:
            config = config or self.config
            config.validate()
            st = self._read()
            given = check_clients(self._clients.values() if clients is None else clients)
            carried = []
            for c in given:
                up, down = self._observed(c.mac, st) if c.mac in self._clients else (0, 0)
                carried.append(replace(c, used_up=max(up, c.used_up), used_down=max(down, c.used_down)))
            self.nft.load(render(config, carried, self.clock()))
            self.config = config
            own = self._own if clients is None else {c.mac: c.addresses for c in given}
            self._set_all(carried, own)
            self._loaded = True

    def stop(self) -> None:
        """Remove the table (and with it every rule, set and quota of ours). Idempotent."""
        with self._lock:
            self._loaded = False  # from now on a missing table is meant to be missing
            self.nft.load(render_delete())
            self._set_all([], {})
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def detach(self) -> None:
        """Leave the table in the kernel as it is and stop looking after it (the service exits
        for a restart: paid clients keep their grants, unpaid ones stay captive, and the next
        process takes the table over with its counts)."""
        with self._lock:
            self._loaded = False
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def watch(self) -> None:
        """Follow the kernel's table events (`nft -j monitor tables`) and put the table back
        the moment something else deletes it. Ends with stop()."""
        if self._watch is None:
            self._watch = TableWatch(self.nft.argv, self.ensure)
            self._watch.start()

    def ensure(self) -> bool:
        """Put the table back if it was loaded and something removed it (fw4 flush, `nft flush
        ruleset`); True if it did. One `nft` run when the table is there."""
        with self._lock:
            if not self._loaded or self.nft.table_exists(FAMILY, TABLE):
                return False
            self._restore()
            return True

    # -- clients ----------------------------------------------------------------------------

    def clients(self) -> dict[str, PaidClient]:
        with self._lock:
            return dict(self._clients)

    def allow(self, client: PaidClient) -> None:
        """Give a client access (or replace its addresses/tariff). If the MAC is already paid,
        its counted usage is kept (the larger of the kernel's count and `client.used_*`)."""
        with self._lock:
            c = client.normalized()
            for mac, other in list(self._clients.items()):
                shared = set(other.addresses) & set(c.addresses)
                if mac == c.mac or not shared:
                    continue
                if shared & set(self._own.get(mac, ())):
                    raise ClientAddressError(f"address already bound to {mac}")
                # only learned by the other device (its neighbour entry moved): it goes there first
                self._set_ipv6(mac, tuple(a for a in other.ipv6 if a not in shared))
            self._apply(c.mac, lambda st: self._carry(c, st))
            self._own[c.mac] = c.addresses

    def update_quota(self, mac: str, *, quota_bytes: int | None = None, expires_at: float | None = None) -> None:
        """After a payment: raise the total byte allowance and/or move the expiry time. None
        leaves that limit unchanged. Used bytes are not reset. A frozen device keeps passing
        nothing: its new allowance waits for the thaw."""
        with self._lock:
            mac = normalize_mac(mac)
            old = self._clients.get(mac)
            if old is None:
                raise UnknownClient(f"no paid client {mac}")
            if mac in self._frozen and quota_bytes is not None:
                self._frozen[mac] = int(quota_bytes)
                quota_bytes = 0
            new = replace(
                old,
                quota_bytes=old.quota_bytes if quota_bytes is None else int(quota_bytes),
                expires_at=old.expires_at if expires_at is None else float(expires_at),
            )
            new.normalized()
            if self._raise_quota(old, new):
                return
            self._apply(mac, lambda st: self._carry(new, st))

    def freeze(self, mac: str) -> bool:
        """Stop a byte-billed device's traffic now, keeping its elements and counts: its quota's
        limit lowered in place to nothing (`add quota` of an existing quota, as a payment's raise
        does), one batch, no read. A settlement then reads a count that no longer moves, and the
        revoke that follows loses nothing unbilled. False (nothing done) for a device without a
        byte quota (nothing it moves is billed by the byte) or not paid."""
        with self._lock:
            mac = normalize_mac(mac)
            c = self._clients.get(mac)
            if c is None or c.quota_bytes is None:
                return False
            if mac not in self._frozen:
                self.nft.load(f"add quota {FAMILY} {TABLE} {quota_name(mac)} {{ over 0 bytes; }}\n")
                self._frozen[mac] = c.quota_bytes
                self._clients[mac] = replace(c, quota_bytes=0)  # a restore or a replace keeps it frozen
            return True

    def thaw(self, mac: str) -> None:
        """Undo `freeze` (the close failed: the channel is still open): the device's allowance
        back, in a quota object that counts the bytes its elements accepted (the frozen one also
        counted the packets it dropped). Nothing if it is not frozen (or was revoked since)."""
        with self._lock:
            mac = normalize_mac(mac)
            quota = self._frozen.pop(mac, None)
            c = self._clients.get(mac)
            if quota is None or c is None:
                return
            new = replace(c, quota_bytes=quota)
            self._apply(mac, lambda st: self._carry(new, st))

    def revoke(self, mac: str) -> ClientUsage | None:
        """Cut a client off now. Returns its final usage (None if it was not a paid client)."""
        with self._lock:
            mac = normalize_mac(mac)
            if mac not in self._clients:
                return None
            final: list[ClientUsage] = []

            def build(st: _State) -> PaidClient | None:
                final[:] = [self._usage_of(self._clients[mac], st)]
                return None

            self._apply(mac, build)
            return final[0]

    def sync_addresses(self, neighbours: Iterable[tuple[str, str]]) -> list[str]:
        """Grant each paid device the global IPv6 addresses the kernel's neighbour table binds to
        its MAC (`neighbours`: (address, MAC) of its usable entries) besides the addresses its grant
        names, and remove those it no longer binds to it. Returns the MACs whose grant changed.
        One read and one batch for every device that changes (200 devices: one `nft -j list table`,
        not one each); nothing is read from the kernel when nothing changes."""
        table: dict[str, str] = {}
        for address, mac in neighbours:
            try:
                table[str(ipaddress.ip_address(address))] = normalize_mac(mac)
            except (ValueError, ClientAddressError):
                continue
        with self._lock:
            taken = {a for own in self._own.values() for a in own}
            plan: dict[str, tuple[str, ...]] = {}
            for mac, c in self._clients.items():
                own6 = tuple(a for a in self._own.get(mac, c.addresses) if ":" in a)
                want = tuple(dict.fromkeys(own6 + tuple(learned_ipv6(mac, c.ipv6, table, taken))))
                if set(want) != set(c.ipv6):
                    plan[mac] = want
            if plan:
                try:
                    self._apply_many({mac: replace(self._clients[mac], ipv6=want) for mac, want in plan.items()})
                except FirewallError as e:
                    # Something changed between the read and the write (an element timed out): one
                    # device at a time, each from a fresh read, removals first (an address that moved
                    # to another device is free before it is added).
                    log.info("one batch for %d devices' IPv6 addresses refused (%s); one at a time", len(plan), e)
                    for mac, want in plan.items():
                        kept = tuple(a for a in self._clients[mac].ipv6 if a in want)
                        if kept != self._clients[mac].ipv6:
                            self._set_ipv6(mac, kept)
                    for mac, want in plan.items():
                        if set(want) != set(self._clients[mac].ipv6):
                            self._set_ipv6(mac, want)
            for mac in plan:
                log.info("%s: IPv6 addresses granted: %s", mac, ", ".join(self._clients[mac].ipv6) or "none")
            return list(plan)

    def unresolved(self, neighbours: Iterable[tuple[str, str]]) -> list[str]:
        """Source addresses the last read found paid devices using without a grant (`seen6`) that
        the neighbour table does not bind to that device yet: for the caller to solicit."""
        bound = {(normalize_mac(m), str(ipaddress.ip_address(a))) for a, m in neighbours if ":" in a}
        with self._lock:
            st = self._last
            if st is None:
                return []
            return sorted({a for m, a in st.seen6 if m in self._clients and (m, a) not in bound and is_global6(a)})

    def usage(self) -> dict[str, ClientUsage]:
        """Usage of every paid client from one `nft -j list table` read (the table is put back
        first if it went missing)."""
        with self._lock:
            st = self._read()
            if not st.exists and self._loaded:
                self._restore()
                st = self._read()
            return {mac: self._usage_of(c, st) for mac, c in self._clients.items()}

    # -- internals --------------------------------------------------------------------------

    def _read(self) -> _State:
        try:
            if isinstance(self.nft, Nft):  # parsed compactly (a stand-in nft gives plain objects)
                objs = self.nft.list_json("table", FAMILY, TABLE, object_hook=_compact)
            else:
                objs = self.nft.list_json("table", FAMILY, TABLE)
            self._last = parse_state(objs)
            return self._last
        except FirewallError:
            if not self.nft.table_exists(FAMILY, TABLE):
                return _State(up={}, down={}, maps={}, quotas={}, exists=False)
            raise

    def _restore(self) -> None:
        """The table is gone with its counters: load it again, atomically and fail-closed (the
        whole captive ruleset), with every paid client's grant and the bytes last counted for it
        (what a client used since that last read is lost with the kernel's counters)."""
        t0 = time.monotonic()
        clients = []
        for c in self._clients.values():
            up, down = self._seen.get(c.mac, (0, 0))
            clients.append(replace(c, used_up=max(up, c.used_up), used_down=max(down, c.used_down)))
        self.nft.load(render(self.config, clients, self.clock()))
        self._set_all(clients, self._own)
        self.restores += 1
        log.warning("table %s %s was deleted from the kernel (fw4 flush, nft flush ruleset?): restored with "
                    "%d paid clients in %.0f ms", FAMILY, TABLE, len(clients), (time.monotonic() - t0) * 1000)

    def _set_all(self, clients: Iterable[PaidClient], own: dict[str, tuple[str, ...]]) -> None:
        """After a whole-table load: these clients, their counts all in their elements."""
        self._clients = {c.mac: c for c in clients}
        self._seen = {c.mac: (c.used_up, c.used_down) for c in self._clients.values()}
        self._own = {mac: own.get(mac, c.addresses) for mac, c in self._clients.items()}
        self._retired = {}
        # still frozen only where the new grant is (a caller's list has the real allowance)
        self._frozen = {m: q for m, q in self._frozen.items()
                        if m in self._clients and self._clients[m].quota_bytes == 0}

    @staticmethod
    def _leftover_counts(c: PaidClient, st: _State, own: set[str]) -> PaidClient:
        """A table left by a previous run (a crash and respawn, not a reboot) counted bytes the
        caller's ledger has not seen yet: keep the kernel's figures when they are ahead. The
        IPv6 addresses that table had learned for the device stay granted (no device's own)."""
        addrs = {a for m, a in st.up if m == c.mac}
        up = sum(st.up[(c.mac, a)] for a in addrs)
        down = sum(st.down.get(a, 0) for a in addrs | set(c.addresses))
        learned = sorted(a for a in addrs if ":" in a and a not in own and is_global6(a))[:MAX_LEARNED]
        c = replace(c, ipv6=c.ipv6 + tuple(learned))
        return replace(c, used_up=up, used_down=down) if up + down > c.used else c

    def _set_ipv6(self, mac: str, ipv6: tuple[str, ...]) -> None:
        new = replace(self._clients[mac], ipv6=ipv6)
        self._apply(mac, lambda st: self._carry(new, st))

    def _observed(self, mac: str, st: _State) -> tuple[int, int]:
        """Bytes counted so far for a known client: the kernel's counters, or the last values
        seen if its elements are gone (expired)."""
        c = self._clients[mac]
        gone_up, gone_down = self._retired.get(mac, (0, 0))
        up = gone_up + sum(st.up.get((mac, a), 0) for a in c.addresses)
        down = gone_down + sum(st.down.get(a, 0) for a in c.addresses)
        seen_up, seen_down = self._seen.get(mac, (0, 0))
        up, down = max(up, seen_up), max(down, seen_down)
        self._seen[mac] = (up, down)
        return up, down

    def _usage_of(self, c: PaidClient, st: _State) -> ClientUsage:
        up, down = self._observed(c.mac, st)
        present = any((c.mac, a) in st.up for a in c.addresses)
        expired = (c.expires_at is not None and self.clock() >= c.expires_at) or not present
        q = st.quotas.get(quota_name(c.mac))
        exhausted = c.quota_bytes is not None and (
            (q is not None and q[1] >= q[0]) or up + down >= c.quota_bytes
        )
        return ClientUsage(up, down, expired, exhausted)

    def _carry(self, c: PaidClient, st: _State) -> PaidClient:
        if c.mac in self._clients:
            up, down = self._observed(c.mac, st)
            c = replace(c, used_up=max(up, c.used_up), used_down=max(down, c.used_down))
        return c

    def _apply(self, mac: str, build: Callable[[_State], PaidClient | None], attempts: int = 3) -> None:
        """Replace one client's elements and quota in one batch, built from a fresh read (only
        elements that exist are deleted: an element may have just timed out). Retried if the
        kernel changed between read and write."""
        for attempt in range(attempts):
            st = self._fresh()
            new = build(st)
            batch = self._batch(mac, new, st)
            try:
                self.nft.load(batch.text())
            except FirewallError:
                if attempt == attempts - 1:
                    raise
                continue
            self._applied(mac, new, batch.retired)
            return

    def _apply_many(self, new: dict[str, PaidClient]) -> None:
        """Several known clients' new grants from one read in one batch: every deletion before any
        addition, so an address that moves from one device to another is free when it is added."""
        st = self._fresh()
        batches = {mac: self._batch(mac, self._carry(c, st), st) for mac, c in new.items()}
        pre = [line for b in batches.values() for line in b.pre]
        post = [line for b in batches.values() for line in b.post]
        self.nft.load("\n".join(pre + post) + "\n")
        for mac, b in batches.items():
            self._applied(mac, b.new, b.retired)

    def _fresh(self) -> _State:
        """A whole-table read; a table found missing is put back first."""
        st = self._read()
        if not st.exists:
            if not self._loaded:
                raise FirewallError("table inet bitmesh is not loaded; call start() first")
            self._restore()
            st = self._read()
        return st

    def _applied(self, mac: str, new: PaidClient | None, retired: tuple[int, int] | None) -> None:
        """The gate's state after a batch for `mac` was loaded."""
        if new is None:
            for d in (self._clients, self._seen, self._own, self._retired, self._frozen):
                d.pop(mac, None)
            return
        self._clients[mac] = new
        self._seen[mac] = (new.used_up, new.used_down)
        if retired is None:  # every element written anew, with all the bytes counted
            self._retired.pop(mac, None)
        else:
            up, down = self._retired.get(mac, (0, 0))
            self._retired[mac] = (up + retired[0], down + retired[1])

    def _raise_quota(self, old: PaidClient, new: PaidClient) -> bool:
        """A payment's usual change, a byte allowance raised with addresses and expiry unchanged,
        without a whole-table read: the quota object's limit is raised in place (`add quota` of an
        existing quota updates its limit and keeps its count, Linux >= 5.4), one read of that
        quota first. In place only while the device never went over: then the quota counted
        exactly the bytes its elements accepted (each packet it let through is counted by them
        next). Once over, the quota also counted the packets it dropped, which the device did not
        get: the whole-table path writes a new quota carrying the accepted bytes only. False if
        this is not that change, the device is over, or the kernel refuses: the caller takes the
        whole-table path."""
        ms = timeout_ms(old, self.clock())
        if (old.addresses != new.addresses or old.expires_at != new.expires_at or old.quota_bytes is None
                or new.quota_bytes is None or new.quota_bytes < old.quota_bytes or (ms is not None and ms <= 0)):
            return False
        qn, t = quota_name(old.mac), f"{FAMILY} {TABLE}"
        try:
            quotas = [o["quota"] for o in self.nft.list_json("quota", FAMILY, TABLE, qn) if "quota" in o]
            q = quotas[0] if len(quotas) == 1 and quotas[0].get("name") == qn else None
            if q is None or int(q.get("used", 0)) >= int(q.get("bytes", 0)) or int(q["bytes"]) != old.quota_bytes:
                return False
            self.nft.load("\n".join([f"add quota {t} {qn} {{ over {int(new.quota_bytes)} bytes; }}",
                                      *dns_uncut(old.mac)]) + "\n")
        except (FirewallError, KeyError, TypeError, ValueError) as e:
            log.debug("%s: quota raise in place not possible (%s); from a whole-table read", old.mac, e)
            return False
        self._clients[old.mac] = new
        return True

    def _batch(self, mac: str, new: PaidClient | None, st: _State) -> _Batch:
        """The batch that turns `mac`'s elements into `new`'s (None: removes them), and the bytes
        counted on counting elements it deletes while others stay (None: every counting element
        is written anew, carrying all of the device's bytes)."""
        pre: list[str] = []
        post: list[str] = []
        old = self._clients.get(mac)
        qn = quota_name(mac)
        t = f"{FAMILY} {TABLE}"
        now = self.clock()
        # Same expiry: the counting elements of addresses that stay are left alone (no bytes can
        # slip between our read and the replace); only what changes is deleted or added.
        keep = old is not None and new is not None and old.expires_at == new.expires_at
        old_addrs = old.addresses if old is not None else ()
        new_addrs = new.addresses if new is not None else ()
        gone = [a for a in old_addrs if not keep or a not in new_addrs]
        added = [a for a in new_addrs if not keep or a not in old_addrs]
        # The quota object is replaced (with the bytes counted as used) when its terms change.
        keep_quota = (keep and old.quota_bytes == new.quota_bytes
                      and (new.quota_bytes is None or qn in st.quotas))
        unmap = gone if keep_quota else old_addrs
        retired = [0, 0]
        # Map elements first: a quota object cannot be deleted while referenced.
        for a in old_addrs:
            v = 4 if ":" not in a else 6
            if a in unmap and (mac, a) in st.maps.get(f"quota_up{v}", ()):
                pre.append(f"delete element {t} quota_up{v} {{ {mac} . {a} }}")
            if a in unmap and a in st.maps.get(f"quota_down{v}", ()):
                pre.append(f"delete element {t} quota_down{v} {{ {a} }}")
            if a in gone and (mac, a) in st.up:
                pre.append(f"delete element {t} paid{v} {{ {mac} . {a} }}")
                retired[0] += st.up[(mac, a)]
            if a in gone and a in st.down:
                pre.append(f"delete element {t} down{v} {{ {a} }}")
                retired[1] += st.down[a]
        if not keep and mac in st.macs:
            pre.append(f"delete element {t} paid_macs {{ {mac} }}")
        if not keep_quota and qn in st.quotas:
            pre.append(f"delete quota {t} {qn}")
        if new is not None:
            if keep:
                el = ClientElements()
                ms = timeout_ms(new, now)
                if not keep_quota and new.quota_bytes is not None:
                    el.quota = client_elements(new, now).quota
                for a in new_addrs if ms is None or ms > 0 else ():  # expired: nothing to add
                    address_elements(el, new, a, ms, counting=a in added, quota=a in added or not keep_quota)
            else:
                el = client_elements(new, now)
            if el.quota:
                post.append(f"add quota {t} {qn} {{ {el.quota}; }}")
            for name, items in el.sets.items():
                post.append(f"add element {t} {name} {{ {', '.join(items)} }}")
        if new is not None and not keep_quota:
            post.extend(dns_uncut(mac))  # new terms: its DNS goes to the owner's resolver again
        return _Batch(new, pre, post, tuple(retired) if keep else None)


@dataclass
class _Batch:
    """One client's part of an `nft -f` batch: deletions (`pre`) go before additions (`post`)."""

    new: PaidClient | None
    pre: list[str]
    post: list[str]
    retired: tuple[int, int] | None  # bytes of counting elements deleted while others stay

    def text(self) -> str:
        return "\n".join(self.pre + self.post) + "\n"


class TableWatch:
    """`nft -j monitor tables` in a thread: `on_deleted()` runs whenever a deletion of `table inet
    bitmesh` is reported (our own atomic replaces report one too, so the callback checks before it
    acts). The monitor sleeps in the kernel between events: no polling. If it dies it is started
    again after `retry` seconds; the meter's periodic read covers the gap."""

    def __init__(self, nft_argv: tuple[str, ...], on_deleted: Callable[[], object], retry: float = 5.0):
        self.argv = [*nft_argv, "-j", "monitor", "tables"]
        self.on_deleted = on_deleted
        self.retry = retry
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="nft-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
        self._thread.join(5)

    @staticmethod
    def is_our_deletion(line: str) -> bool:
        try:
            table = json.loads(line).get("delete", {}).get("table", {})
        except (ValueError, AttributeError):
            return False
        return table.get("family") == FAMILY and table.get("name") == TABLE

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
            except OSError as e:
                log.warning("nft monitor not started (%s); a deleted table is noticed at the next meter pass", e)
                self._stop.wait(self.retry)
                continue
            if self._stop.is_set():  # stop() came between the loop test and the start
                self._proc.terminate()
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                if self.is_our_deletion(line):
                    try:
                        self.on_deleted()
                    except Exception:
                        log.exception("restoring table %s %s failed; the next meter pass tries again", FAMILY, TABLE)
            err = self._proc.stderr.read().strip() if self._proc.stderr else ""
            self._proc.wait()
            if not self._stop.is_set():
                log.warning("nft monitor ended (%s); started again in %.0f s", err[-200:] or self._proc.returncode,
                            self.retry)
                self._stop.wait(self.retry)
