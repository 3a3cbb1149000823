"""A payer's whole session against a portal: open, check terms, refund first, fund, pay, close.

Used by the `bitmesh pay` command and by the tests; the rules are in bitmesh.channel.payer.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bitcoin.wallet import CKey

from bitmesh.chain.address import address_to_script
from bitmesh.channel import contract as c
from bitmesh.channel.payer import (
    Coin,
    MeterBounds,
    OfferTerms,
    PayerChannel,
    PayerLimits,
    build_funding,
    check_meter,
    check_terms,
    offer_terms,
    unmetered_owed,
)
from bitmesh.channel.wire import sign_proof
from bitmesh.portal.client import PortalClient, PortalError

log = logging.getLogger(__name__)

OPEN_ATTEMPTS = 3  # opens refused because demand pricing moved the price meanwhile (offer read again)


@dataclass
class PayerSession:
    portal: PortalClient
    tip_height: Callable[[], int]  # the payer's own view of the chain, to judge the expiry
    refund_address: str
    limits: PayerLimits = PayerLimits()
    feerate_sat_vb: float = 2.0
    bounds: MeterBounds = MeterBounds()
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    channel: PayerChannel | None = None
    channel_id: str | None = None
    terms: OfferTerms | None = None  # the offer's step and tariff, fixed at open
    network: str = ""
    access_since: float | None = None  # clock() when the first payment left: the meter runs from there
    client_secret: bytes = field(default=b"", repr=False)  # the channel's client key: kept (record()) to prove it
    concurrent_seen: int = 0  # sightings of concurrent use already reported (`bitmesh pay` says each new one)

    @property
    def prepay_step(self) -> int:
        return self.terms.prepay_step if self.terms else 0

    def open(self, deposit: int, client_secret: bytes | None = None) -> dict:
        self.client_secret = client_secret or secrets.token_bytes(32)
        key = CKey(self.client_secret, compressed=True)
        for attempt in range(OPEN_ATTEMPTS):
            offer = self.portal.offer()
            self.network = offer["network"]
            self.terms = offer_terms(offer)  # later answers never change them
            refund_script = address_to_script(self.refund_address, self.network)
            tariff = self.terms.tariff.to_json()
            try:
                # Naming the offer's prices: the router opens at exactly these or refuses.
                terms = self.portal.open_channel(bytes(key.pub), deposit, self.refund_address, tariff=tariff)
                break
            except PortalError as e:
                if e.code != "price_changed" or attempt == OPEN_ATTEMPTS - 1:
                    raise
                log.info("the price moved between the offer and the open: reading the offer again")
        if terms.get("tariff", tariff) != tariff:  # a router must record what it was asked for
            raise PortalError(f"the channel states {terms['tariff']}, the offer said {tariff}", code="price_changed")
        contract = check_terms(terms, bytes(key.pub), deposit, refund_script, self.tip_height(), self.limits)
        self.channel = PayerChannel(contract, key, deposit, refund_script)
        self.channel_id = terms["channel_id"]
        return terms

    def fund_from_coins(self, coins: list[Coin], change_script: bytes, refund_path: Path | None = None) -> dict:
        """Build the funding, sign the refund for it and keep it, and only then hand the
        funding to the portal (which broadcasts it)."""
        ch = self._open_channel()
        funding_tx = build_funding(coins, ch.deposit, ch.contract, change_script, self.feerate_sat_vb)
        outpoint = c.Outpoint(c.txid_of(funding_tx), 0)
        refund = ch.prepare_refund(outpoint, self.feerate_sat_vb)
        if refund_path is not None:
            refund_path.write_text(refund.serialize().hex() + "\n")
        return self.portal.fund(self.channel_id or "", raw_tx=funding_tx.serialize(), vout=0)

    def checked_owed(self, report: dict) -> int:
        """What to pay for, from a session report: the router's `owed`, refused (owed_implausible)
        unless the elapsed time, the bytes and the tariff fixed at open account for it; from an
        unmetered router (its `owed` is all that was paid), this payer's own clock."""
        ch = self._open_channel()
        assert self.terms is not None
        elapsed = None if self.access_since is None else self.clock() - self.access_since
        if not self.terms.metered:
            return unmetered_owed(self.terms.tariff, elapsed)
        return check_meter(report, self.terms.tariff, max(ch.signed_max, ch.paid), elapsed, self.bounds)

    def pay_for(self, owed: int) -> dict:
        """Sign for what is owed plus one prepay step (never more) and send it."""
        ch = self._open_channel()
        amount = ch.next_amount(owed, self.prepay_step)
        if amount <= ch.paid:
            return {"paid": ch.paid, "remaining": ch.deposit - ch.paid}
        return self.pay_exact(amount)

    def pay_exact(self, amount: int) -> dict:
        ch = self._open_channel()
        if self.access_since is None:
            self.access_since = self.clock()  # before it leaves: the router's meter starts later
        try:
            answer = self.portal.pay(self.channel_id or "", ch.payment_message(amount))
        except PortalError as e:
            if e.code != "payment_not_increasing":
                raise
            # An earlier payment was stored but its answer lost (router restart, timeout):
            # the router holds our signature for that amount, so take its figure (protocol 5).
            stored = int(self.portal.channel(self.channel_id or "")["paid"])
            ch.acknowledged(stored)
            if stored >= amount:
                return {"channel_id": self.channel_id, "paid": stored, "remaining": ch.deposit - stored}
            answer = self.portal.pay(self.channel_id or "", ch.payment_message(amount))
        ch.acknowledged(answer["paid"])
        return answer

    def proof(self, action: str) -> str:
        """This channel's proof for `action` ("session", "close"): its client key's signature."""
        return sign_proof(self._open_channel().client_key, action, self.channel_id or "")

    def session(self) -> dict:
        """The channel's session as the router meters it (proven: nobody else may read it)."""
        return self.portal.session(self.channel_id or "", self.proof("session"))

    def close(self) -> dict:
        return self.portal.close(self.channel_id or "", self.proof("close"))

    def record(self) -> dict:
        """What a payer keeps with its channel to act on it later (close it, read its session):
        the client key among the rest; a secret, like the refund's key."""
        ch = self._open_channel()
        return {"portal": self.portal.base_url, "network": self.network, "channel_id": self.channel_id,
                "client_secret": self.client_secret.hex(), "deposit": ch.deposit,
                "expiry": ch.contract.expiry, "refund_address": self.refund_address}

    def _open_channel(self) -> PayerChannel:
        if self.channel is None:
            raise RuntimeError("open() first")
        return self.channel
