"""A payer's whole session against a portal: open, check terms, refund first, fund, pay, close.

Used by the `bitmesh pay` command and by the tests; the rules are in bitmesh.channel.payer.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bitcoin.wallet import CKey

from bitmesh.chain.address import address_to_script
from bitmesh.channel import contract as c
from bitmesh.channel.payer import Coin, PayerChannel, PayerLimits, build_funding, check_terms
from bitmesh.portal.client import PortalClient, PortalError

log = logging.getLogger(__name__)


@dataclass
class PayerSession:
    portal: PortalClient
    tip_height: Callable[[], int]  # the payer's own view of the chain, to judge the expiry
    refund_address: str
    limits: PayerLimits = PayerLimits()
    feerate_sat_vb: float = 2.0
    channel: PayerChannel | None = None
    channel_id: str | None = None
    prepay_step: int = 0
    network: str = ""

    def open(self, deposit: int, client_key: CKey | None = None) -> dict:
        offer = self.portal.offer()
        self.network = offer["network"]
        self.prepay_step = int(offer["prepay_step_sat"])
        key = client_key or CKey(secrets.token_bytes(32))
        refund_script = address_to_script(self.refund_address, self.network)
        terms = self.portal.open_channel(bytes(key.pub), deposit, self.refund_address)
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

    def pay_for(self, owed: int) -> dict:
        """Sign for what is owed plus one prepay step (never more) and send it."""
        ch = self._open_channel()
        amount = ch.next_amount(owed, self.prepay_step)
        if amount <= ch.paid:
            return {"paid": ch.paid, "remaining": ch.deposit - ch.paid}
        return self.pay_exact(amount)

    def pay_exact(self, amount: int) -> dict:
        ch = self._open_channel()
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

    def close(self) -> dict:
        return self.portal.close(self.channel_id or "")

    def _open_channel(self) -> PayerChannel:
        if self.channel is None:
            raise RuntimeError("open() first")
        return self.channel
