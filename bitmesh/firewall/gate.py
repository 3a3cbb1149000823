"""Gate: the service's handle on `table inet bitmesh`.

Every change is one atomic `nft -f` batch; every read is one `nft -j list table` call covering
all clients (no process per client). The kernel enforces quotas and expiry by itself, so the
caller only polls `usage()` at a modest interval or after events, to bill and to notice ends.

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
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from bitmesh.firewall.nft import Nft
from bitmesh.firewall.ruleset import (
    FAMILY,
    TABLE,
    ClientAddressError,
    FirewallConfig,
    FirewallError,
    PaidClient,
    UnknownClient,
    check_clients,
    client_elements,
    normalize_mac,
    quota_name,
    render,
    render_delete,
)

log = logging.getLogger(__name__)


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


def _norm(x):
    if isinstance(x, str):
        try:
            return str(ipaddress.ip_address(x))
        except ValueError:
            return x.lower()
    return x


def _key(v):
    if isinstance(v, dict):
        if "elem" in v:
            return _key(v["elem"]["val"])
        if "concat" in v:
            return tuple(_norm(x) for x in v["concat"])
    return _norm(v)


def _counter_bytes(v) -> int:
    if isinstance(v, dict) and "elem" in v:
        return int((v["elem"].get("counter") or {}).get("bytes", 0))
    return 0


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
        elif "map" in o:
            m = o["map"]
            keys = st.maps.setdefault(m["name"], set())
            for e in m.get("elem", []) or []:
                keys.add(_key(e[0] if isinstance(e, list) else e))
    return st


class Gate:
    """Drive `table inet bitmesh`. Thread-safe; all methods block for one or two `nft` runs."""

    def __init__(self, config: FirewallConfig, nft: Nft | None = None, clock: Callable[[], float] = time.time):
        config.validate()
        self.config = config
        self.nft = nft or Nft()
        self.clock = clock
        self._clients: dict[str, PaidClient] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # last (up, down) observed per MAC
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
            cl = [self._leftover_counts(c, leftover) for c in check_clients(clients)]
            self.nft.load(render(self.config, cl, self.clock()))
            self._clients = {c.mac: c for c in cl}
            self._seen = {c.mac: (c.used_up, c.used_down) for c in cl}
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
            self._clients = {c.mac: c for c in carried}
            self._seen = {c.mac: (c.used_up, c.used_down) for c in carried}
            self._loaded = True

    def stop(self) -> None:
        """Remove the table (and with it every rule, set and quota of ours). Idempotent."""
        with self._lock:
            self._loaded = False  # from now on a missing table is meant to be missing
            self.nft.load(render_delete())
            self._clients.clear()
            self._seen.clear()
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
            for mac, other in self._clients.items():
                if mac != c.mac and set(other.addresses) & set(c.addresses):
                    raise ClientAddressError(f"address already bound to {mac}")
            self._apply(c.mac, lambda st: self._carry(c, st))

    def update_quota(self, mac: str, *, quota_bytes: int | None = None, expires_at: float | None = None) -> None:
        """After a payment: raise the total byte allowance and/or move the expiry time. None
        leaves that limit unchanged. Used bytes are not reset."""
        with self._lock:
            mac = normalize_mac(mac)
            old = self._clients.get(mac)
            if old is None:
                raise UnknownClient(f"no paid client {mac}")
            new = replace(
                old,
                quota_bytes=old.quota_bytes if quota_bytes is None else int(quota_bytes),
                expires_at=old.expires_at if expires_at is None else float(expires_at),
            )
            new.normalized()
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
            return parse_state(self.nft.list_json("table", FAMILY, TABLE))
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
        self._clients = {c.mac: c for c in clients}
        self._seen = {c.mac: (c.used_up, c.used_down) for c in clients}
        self.restores += 1
        log.warning("table %s %s was deleted from the kernel (fw4 flush, nft flush ruleset?): restored with "
                    "%d paid clients in %.0f ms", FAMILY, TABLE, len(clients), (time.monotonic() - t0) * 1000)

    @staticmethod
    def _leftover_counts(c: PaidClient, st: _State) -> PaidClient:
        """A table left by a previous run (a crash and respawn, not a reboot) counted bytes the
        caller's ledger has not seen yet: keep the kernel's figures when they are ahead."""
        up = sum(st.up.get((c.mac, a), 0) for a in c.addresses)
        down = sum(st.down.get(a, 0) for a in c.addresses)
        return replace(c, used_up=up, used_down=down) if up + down > c.used else c

    def _observed(self, mac: str, st: _State) -> tuple[int, int]:
        """Bytes counted so far for a known client: the kernel's counters, or the last values
        seen if its elements are gone (expired)."""
        c = self._clients[mac]
        up = sum(st.up.get((mac, a), 0) for a in c.addresses)
        down = sum(st.down.get(a, 0) for a in c.addresses)
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
            st = self._read()
            if not st.exists:
                if not self._loaded:
                    raise FirewallError("table inet bitmesh is not loaded; call start() first")
                self._restore()
                st = self._read()
            new = build(st)
            text = self._batch(mac, new, st)
            try:
                self.nft.load(text)
            except FirewallError:
                if attempt == attempts - 1:
                    raise
                continue
            if new is None:
                self._clients.pop(mac, None)
                self._seen.pop(mac, None)
            else:
                self._clients[mac] = new
                self._seen[mac] = (new.used_up, new.used_down)
            return

    def _batch(self, mac: str, new: PaidClient | None, st: _State) -> str:
        lines: list[str] = []
        old = self._clients.get(mac)
        qn = quota_name(mac)
        t = f"{FAMILY} {TABLE}"
        # Same addresses and expiry: leave the counting elements alone (no bytes can slip
        # between our read and the replace); only the quota object and its map entries change.
        keep = (
            old is not None
            and new is not None
            and (old.addresses, old.expires_at) == (new.addresses, new.expires_at)
        )
        if old is not None:
            # Map elements first: a quota object cannot be deleted while referenced.
            for a in old.addresses:
                v = 4 if ":" not in a else 6
                if (mac, a) in st.maps.get(f"quota_up{v}", ()):
                    lines.append(f"delete element {t} quota_up{v} {{ {mac} . {a} }}")
                if a in st.maps.get(f"quota_down{v}", ()):
                    lines.append(f"delete element {t} quota_down{v} {{ {a} }}")
                if (mac, a) in st.up and not keep:
                    lines.append(f"delete element {t} paid{v} {{ {mac} . {a} }}")
                if a in st.down and not keep:
                    lines.append(f"delete element {t} down{v} {{ {a} }}")
        if qn in st.quotas:
            lines.append(f"delete quota {t} {qn}")
        if new is not None:
            el = client_elements(new, self.clock())
            if el.quota:
                lines.append(f"add quota {t} {qn} {{ {el.quota}; }}")
            for name, items in el.sets.items():
                if keep and not name.startswith("quota_"):
                    continue
                lines.append(f"add element {t} {name} {{ {', '.join(items)} }}")
        return "\n".join(lines) + "\n"


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
