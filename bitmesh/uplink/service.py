"""Uplink mode's I/O: the buyer's decisions (bitmesh.uplink.buyer) carried out against the
upstream portal with the real payer client (bitmesh.paying.PayerSession, what `bitmesh pay`
runs), paid from the owner-funded wallet (bitmesh.uplink.wallet), remembered in the book
(bitmesh.uplink.store). Loaded only when uplink_enabled is set.

One `tick()` per timer pass of the service (no thread of its own): open and fund an uplink
channel when there is none, read the upstream meter, top up one step ahead, retire a spent
channel, and answer the verdict (sell or not, cut or not) the service applies.

Crash safety, in order: the book names the channel before its funding leaves (its client key is
derived from the seed and the channel's number), the refund is on disk before the funding is
handed to the upstream portal (PayerSession.fund_from_coins), and a payment's amount is in the
book (signed_max) before it is sent. A restart resumes the channel from the book.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from bitcoin.core import CTransaction
from bitcoin.wallet import CKey

from bitmesh.chain.address import address_to_script
from bitmesh.channel import contract as c
from bitmesh.channel.keys import load_or_create_seed
from bitmesh.channel.payer import PayerChannel, offer_terms
from bitmesh.channel.server import ChannelPolicy
from bitmesh.channel.state import Phase
from bitmesh.errors import BitMeshError, ConfigError
from bitmesh.paying import PayerSession
from bitmesh.portal.client import PortalClient, PortalError
from bitmesh.tariff import Tariff
from bitmesh.uplink import buyer
from bitmesh.uplink.buyer import Book, UplinkChannel, UplinkPolicy, Verdict
from bitmesh.uplink.store import BookStore
from bitmesh.uplink.wallet import Balance, UplinkWallet

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from collections.abc import Callable

    from bitmesh.chain.base import ChainBackend
    from bitmesh.config import Settings
    from bitmesh.service import Service
    from bitmesh.uplink.offers import OfferBoard

log = logging.getLogger(__name__)

FUNDING_VBYTES_PER_INPUT = 68  # P2WPKH
FUNDING_VBYTES_BASE = 11 + 43 + 31  # version/locktime, the contract output, the change output
BALANCE_SECONDS = 60.0  # the wallet's balance (for status) is read at most this often
PORTAL_TIMEOUT = 10.0
PROBE_TIMEOUT = 3.0  # a market offer's portal that does not answer this fast is not taken
CHOICE_SECONDS = 60.0  # an upstream chosen is kept this long (no probes every pass while none can open)


class Uplink:
    def __init__(self, policy: UplinkPolicy, wallet: UplinkWallet, portal_url: str, state_dir: Path,
                 chain: ChainBackend, clock: Callable[[], float] = time.monotonic,
                 market: OfferBoard | None = None, first_hops: Callable[[], set[str]] | None = None):
        self.policy = policy
        self.wallet = wallet
        self.default_portal = PortalClient(portal_url, timeout=PORTAL_TIMEOUT)  # configured, or the gateway's
        self.market = market  # MQTT on: verified live offers, more candidates (bitmesh.uplink.offers)
        # Hosts our WAN traffic leaves through: only an upstream there can carry what we pay for.
        self.first_hops = first_hops or (lambda: {h for h in (default_gateway(), buyer.portal_host(portal_url)) if h})
        self.state_dir = state_dir
        self.chain = chain
        self.clock = clock
        self.store = BookStore(state_dir / "uplink.json")
        self.book: Book = self.store.load()
        # The open channel's upstream (a restart resumes there); the next one is chosen at its open.
        resumed = self.store.extra.get("portal") if self.book.channel is not None else None
        self.portal = PortalClient(resumed, timeout=PORTAL_TIMEOUT) if resumed else self.default_portal
        self._choice: tuple[PortalClient, float] | None = None  # the last upstream chosen, and when
        self.session: PayerSession | None = None
        self.owed = 0  # what the upstream meter says the open channel owes
        self.verdict = Verdict(False, False, buyer.NO_CHANNEL)
        self.last_ok = clock()
        self.error: str | None = None  # the last failure's code, for status
        self.balance: Balance | None = None  # the wallet's, read every BALANCE_SECONDS at most
        self._balance_at = -BALANCE_SECONDS

    # --- the pass ----------------------------------------------------------------------------

    def tick(self) -> Verdict:
        verdict = self._tick()
        if self.clock() - self._balance_at >= BALANCE_SECONDS or self.balance is None:
            try:
                self.balance, self._balance_at = self.wallet.balance(), self.clock()
            except BitMeshError as e:
                log.warning("uplink wallet balance not read: %s", e.code)
        return verdict

    def _tick(self) -> Verdict:
        why_not: str | None = None
        try:
            why_not = self._pass()
            self.last_ok, self.error = self.clock(), None
        except (OSError, BitMeshError) as e:
            self.error = getattr(e, "code", None) or "uplink_unreachable"
            log.warning("uplink pass failed: %s: %s", self.error, e)
            if self.clock() - self.last_ok >= self.policy.unreachable_seconds:
                why_not = buyer.UPSTREAM_UNREACHABLE
            elif self.verdict.selling:
                return self.verdict  # a moment's failure: keep the last verdict a while
            else:
                why_not = self.verdict.reason
        ch = self.book.channel
        can = why_not is None and ch is not None
        self.verdict = buyer.verdict(ch, self.owed, can, why_not)
        if self.verdict.cut and why_not == buyer.BUDGET_SPENT and ch is not None:
            # Nothing more will be bought on it: settle it now, its unused part back to the wallet.
            try:
                self._close_and_retire()
            except (OSError, BitMeshError) as e:
                log.warning("uplink channel %s not closed yet: %s", ch.channel_id, e)
        return self.verdict

    def _pass(self) -> str | None:
        """Carry out the decisions; the reason the credit cannot be kept ahead, if any."""
        if self.book.channel is None:
            why = self._open()
            if why is not None:
                return why
        ch = self.book.channel
        assert ch is not None
        session = self._session()
        report = session.session()
        if report.get("state") == "closed" or (report.get("channel_id") not in (None, ch.channel_id)):
            log.info("uplink channel %s closed upstream", ch.channel_id)
            self._retire()
            return self._pass_after_retire()
        self.owed = session.checked_owed(report)
        if buyer.channel_spent(ch, self.owed):
            self._close_and_retire()
            return self._pass_after_retire()
        amount = buyer.next_payment(ch, self.owed, self.book.budget_left(self.policy))
        if amount is not None:
            ch.signed_max = max(ch.signed_max, amount)
            self.store.save(self.book)  # the budget counts it before it leaves (StorageError: not sent)
            answer = session.pay_exact(amount)
            ch.paid = int(answer["paid"])
            return None
        if ch.paid - self.owed < max(1, ch.prepay_step // 2):
            return buyer.BUDGET_SPENT  # wanted a top-up, the budget allowed none
        return None

    def _pass_after_retire(self) -> str | None:
        why = self._open()
        if why is not None:
            return why
        return self._pass()

    # --- channels ------------------------------------------------------------------------------

    def _choose(self) -> tuple[PortalClient, dict]:
        """The upstream of a new uplink channel and its offer: the cheapest (buyer.cheapest, at the
        price its portal answers, which the channel gets) of the configured or gateway's portal and,
        MQTT on, the market's verified offers whose portal answers from here (reachable from the
        WAN) as the node that signed the offer. An open channel is never moved: this runs at open."""
        if self.market is not None and self._choice is not None and self.clock() - self._choice[1] < CHOICE_SECONDS:
            return self._choice[0], self._choice[0].offer()  # chosen a moment ago (no channel could open)
        found: list[tuple[PortalClient, dict]] = []
        failure: BaseException | None = None
        try:
            found.append((self.default_portal, self.default_portal.offer()))
        except (OSError, BitMeshError) as e:
            failure = e
        # Only upstreams where our packets leave (the WAN's first hops): paid elsewhere, nothing would be
        # carried (moving the WAN route is not done); nor is any other host an offer names probed.
        for signed in self.market.offers(self.first_hops()) if self.market is not None else []:
            probe = PortalClient(signed["portal_url"], timeout=PROBE_TIMEOUT)
            if probe.base_url == self.default_portal.base_url:
                continue
            try:
                answer = probe.offer()
            except (OSError, BitMeshError) as e:
                log.info("upstream offer of %s not taken: its portal %s does not answer: %s", signed["node_id"],
                         probe.base_url, getattr(e, "code", e))
                continue
            if answer.get("node_id") != signed["node_id"] or answer.get("network") != signed["network"]:
                log.warning("upstream offer of %s not taken: its portal %s answers as node %r", signed["node_id"],
                            probe.base_url, answer.get("node_id"))
                continue
            found.append((PortalClient(probe.base_url, timeout=PORTAL_TIMEOUT), answer))
        priced: list[tuple[PortalClient, dict, Tariff]] = []
        for portal, answer in found:
            try:
                if answer.get("selling", True) is not False:
                    priced.append((portal, answer, offer_terms(answer).tariff))
            except (BitMeshError, KeyError, TypeError, ValueError) as e:
                log.warning("upstream offer of %s not usable: %s", portal.base_url, e)
        url = buyer.cheapest((p.base_url, tariff) for p, _, tariff in priced)
        if url is None:
            if failure is not None:
                raise failure
            raise PortalError("no upstream sells now", code="uplink_not_ready")
        chosen = next((p, a) for p, a, _ in priced if p.base_url == url)
        self._choice = (chosen[0], self.clock())
        return chosen

    def _open(self) -> str | None:
        self.portal, offer = self._choose()
        terms = offer_terms(offer)
        coins = self.wallet.coins()
        feerate = self.chain.estimate_feerate()
        fee = int(feerate * (FUNDING_VBYTES_BASE + FUNDING_VBYTES_PER_INPUT * max(1, len(coins)))) + 1
        deposit, why = buyer.next_deposit(self.policy, self.book, sum(x.value for x in coins), fee,
                                          int(offer["min_deposit_sat"]), int(offer["max_deposit_sat"]),
                                          terms.prepay_step)
        if why is not None:
            return why
        number = self.book.next_number
        session = PayerSession(self.portal, self.chain.tip_height, refund_address=self.wallet.address,
                               feerate_sat_vb=feerate, clock=self.clock)
        answer = session.open(deposit, client_secret=self.wallet.channel_secret(number))
        ch = UplinkChannel(number, str(answer["channel_id"]), deposit, terms.prepay_step, terms.tariff)
        self.book.channel, self.book.next_number = ch, number + 1
        assert session.channel is not None
        self.store.extra = {"portal": self.portal.base_url, "network": session.network,
                            "server_pubkey": session.channel.contract.server_pubkey.hex(),
                            "expiry": session.channel.contract.expiry, "metered": terms.metered}
        self.store.save(self.book)  # named before any coin moves: a restart finds it
        self.session = session
        session.fund_from_coins(coins, self.wallet.script, refund_path=self._refund_path(ch))
        log.info("uplink channel %s funded: %d sat from the wallet", ch.channel_id, deposit)
        return None

    def _session(self) -> PayerSession:
        """The open channel's payer, rebuilt from the book after a restart."""
        if self.session is not None:
            return self.session
        ch = self.book.channel
        assert ch is not None
        extra = self.store.extra
        refund_path = self._refund_path(ch)
        if not refund_path.exists():
            # The refund is written before the funding leaves: without it no coin moved.
            log.info("uplink channel %s was never funded: dropped", ch.channel_id)
            self._retire()
            raise PortalError("the uplink channel was never funded; opening another", code="uplink_not_ready")
        secret = self.wallet.channel_secret(ch.number)
        key = CKey(secret, compressed=True)
        contract = c.Contract(bytes.fromhex(extra["server_pubkey"]), bytes(key.pub), int(extra["expiry"]))
        refund = CTransaction.deserialize(bytes.fromhex(refund_path.read_text().strip()))
        pc = PayerChannel(contract, key, ch.deposit, address_to_script(self.wallet.address, extra["network"]),
                          funding=c.Outpoint(refund.vin[0].prevout.hash[::-1].hex(), refund.vin[0].prevout.n),
                          refund=refund, paid=ch.paid, signed_max=ch.signed_max)
        session = PayerSession(self.portal, self.chain.tip_height, refund_address=self.wallet.address,
                               clock=self.clock, channel=pc, channel_id=ch.channel_id,
                               terms=offer_terms({"prepay_step_sat": ch.prepay_step, "tariff": ch.tariff.to_json(),
                                                  "metered": extra.get("metered", True)}),
                               network=extra["network"], client_secret=secret)
        if ch.signed_max:
            # The window the upstream meter is judged in restarts with this process; an upstream
            # that meters nothing is taken to have used all that was paid (what it says anyway).
            used = ch.paid * 60 / ch.tariff.sat_per_minute if ch.tariff.sat_per_minute else 0.0
            session.access_since = self.clock() - used
        self.session = session
        return session

    def _close_and_retire(self) -> None:
        session = self._session()
        try:
            session.close()
        except PortalError as e:
            if e.http_status < 500 or e.code == "portal_answer_cut":
                log.warning("closing uplink channel: %s", e.code)
            else:
                raise
        self._retire()

    def _retire(self) -> None:
        self.book.retire()
        self.store.save(self.book)
        self.session, self.owed = None, 0

    def close(self) -> None:
        """Close the uplink channel (the service stops selling, or uplink mode is switched off)."""
        if self.book.channel is not None:
            self._close_and_retire()

    def _refund_path(self, ch: UplinkChannel) -> Path:
        return self.state_dir / f"uplink-refund-{ch.channel_id}.hex"

    # --- what the owner sees -------------------------------------------------------------------

    def resale_tariff(self) -> Tariff | None:
        ch = self.book.channel
        return None if ch is None else buyer.resale_tariff(ch.tariff, self.policy.margin_percent)

    def status(self) -> dict:
        ch = self.book.channel
        tariff = self.resale_tariff()
        return {
            "deposit_address": self.wallet.address,
            "wallet": None if self.balance is None else self.balance.to_json(),
            "portal": self.portal.base_url,
            "selling": self.verdict.selling,
            "cut": self.verdict.cut,
            "reason": self.verdict.reason,
            "error": self.error,
            "budget_sat": self.policy.budget_sat,
            "spent_sat": self.book.committed,
            "budget_left_sat": self.book.budget_left(self.policy),
            "margin_percent": self.policy.margin_percent,
            "channel": None if ch is None else {"channel_id": ch.channel_id, "deposit": ch.deposit,
                                                "paid": ch.paid, "owed": self.owed,
                                                "credit": ch.paid - self.owed},
            "upstream_price": None if ch is None else ch.tariff.to_json(),
            "resale_price": None if tariff is None else tariff.to_json(),
        }


# --- wiring into the router's service ---------------------------------------------------------

UPSTREAM_PORTAL_PORT = 8088  # the portal_port default: where a gateway's BitMesh portal listens


def default_gateway(route_table: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 default gateway from the kernel's routing table (no `ip` process needed)."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 2:  # RTF_GATEWAY
            raw = int(fields[2], 16).to_bytes(4, "little")
            return ".".join(str(b) for b in raw)
    return None


def uplink_from_settings(settings: Settings, chain: ChainBackend) -> Uplink:
    """Uplink mode as configured; the seed is the node's (it exists: build_service made it)."""
    state_dir = Path(settings.state_dir)
    seed = load_or_create_seed(state_dir / "seed", create=False)
    portal = settings.uplink_portal
    if not portal:
        gateway = default_gateway()
        if gateway is None:
            raise ConfigError("uplink_portal: empty and no IPv4 default gateway to find the upstream portal at",
                              code="uplink_portal_unknown")
        portal = f"http://{gateway}:{UPSTREAM_PORTAL_PORT}"
    policy = UplinkPolicy(settings.uplink_budget_sat, settings.uplink_deposit_sat, settings.uplink_margin_percent)
    market = None
    if settings.mqtt_enabled:
        from bitmesh.channel.keys import ChannelKeychain
        from bitmesh.market.identity import node_id_of, node_key
        from bitmesh.uplink.offers import OfferBoard  # paho with it: only with MQTT on

        market = OfferBoard(settings, node_id_of(bytes(node_key(ChannelKeychain(seed)).pub))).begin()
    return Uplink(policy, UplinkWallet(seed, chain, settings.network), portal, state_dir, chain, market=market)


class UplinkRunner:
    """Runs the uplink passes in a thread of their own (an upstream that answers slowly never
    delays the meter), every `interval` seconds, and applies each verdict to the service: the
    resale price to new channels, and the cut (open paid client channels closed: they settle
    for what they used)."""

    def __init__(self, service: Service, uplink: Uplink, interval: float = 2.0):
        self.service, self.uplink, self.interval = service, uplink, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="uplink", daemon=True)

    def start(self) -> UplinkRunner:
        self.apply(self.uplink.verdict)  # nothing is sold before the first uplink channel is funded
        log.info("uplink mode: buying from %s, deposit address %s", self.uplink.portal.base_url,
                 self.uplink.wallet.address)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        if self.uplink.market is not None:
            self.uplink.market.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.apply(self.uplink.tick())
            except Exception:
                log.exception("uplink pass failed")
            self._stop.wait(self.interval)

    def terms(self, policy: ChannelPolicy, verdict: Verdict | None = None) -> ChannelPolicy:
        """`policy` with what uplink mode sells at: the resale price, and no sale (closed_reason)
        while upstream credit cannot be kept ahead. A reload builds its new policy through this,
        so no open sees the config's base price in between."""
        verdict = verdict or self.uplink.verdict
        tariff = self.uplink.resale_tariff()
        prices = (policy.sat_per_mb, policy.sat_per_minute) if tariff is None else (
            tariff.sat_per_mb, tariff.sat_per_minute)
        closed = None if verdict.selling else (verdict.reason or buyer.NO_CHANNEL)
        if (policy.sat_per_mb, policy.sat_per_minute, policy.closed_reason) == (*prices, closed):
            return policy
        return dataclasses.replace(policy, sat_per_mb=prices[0], sat_per_minute=prices[1], closed_reason=closed)

    def apply(self, verdict: Verdict) -> None:
        service = self.service
        manager = service.manager
        policy = self.terms(manager.policy, verdict)
        if policy is not manager.policy:
            manager.policy = policy
            if policy.closed_reason is None:
                log.info("selling at the resale price: %d sat/MB, %d sat/min", policy.sat_per_mb,
                         policy.sat_per_minute)
            else:
                log.warning("not selling (%s): new client channels refused", policy.closed_reason)
            service.offer_changed()
        if not verdict.cut:
            return
        cut = []
        for ch in manager.channels():
            if ch.phase in (Phase.OPEN, Phase.FUNDING_UNCONFIRMED):
                manager.close(ch.id, reason="uplink_cut", wait_for_chain=False)
                cut.append(ch.id)
        if cut:
            log.warning("upstream credit ending (%s): clients cut, channels %s settle", verdict.reason, ", ".join(cut))
            service.watch_soon()
