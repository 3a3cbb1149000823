"""`bitmesh pay`: the command-line payer for laptops, Pis and tests.

Opens a channel with a portal, funds it from coins of a key you hold (the refund is signed
and written to disk first), then keeps one prepay step ahead of what the router's meter says
is owed until the time is up or the deposit is spent, and closes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bitcoin.base58 import CBase58Data
from bitcoin.wallet import CKey

from bitmesh.chain import make_backend
from bitmesh.chain.address import p2pkh_script, p2wpkh_script
from bitmesh.channel import contract as c
from bitmesh.channel.payer import Coin, MeterBounds, PayerLimits
from bitmesh.channel.wire import sign_proof
from bitmesh.errors import ChannelError, RequestError
from bitmesh.paying import PayerSession
from bitmesh.portal.client import PortalClient, PortalError


def parse_key(text: str) -> CKey:
    """A private key as 64 hex digits or WIF (any network's version byte)."""
    text = text.strip()
    try:
        if len(text) == 64:
            return CKey(bytes.fromhex(text), compressed=True)
        data = bytes(CBase58Data(text))
    except Exception:
        raise RequestError("--fund-key: not a hex or WIF private key", code="key_invalid") from None
    if len(data) not in (32, 33):
        raise RequestError("--fund-key: not a hex or WIF private key", code="key_invalid")
    return CKey(data[:32], compressed=True)


def parse_coin(text: str, key: CKey) -> Coin:
    """TXID:VOUT:SATS[:p2pkh] (default P2WPKH of the funding key)."""
    parts = text.split(":")
    try:
        txid, vout, value = parts[0], int(parts[1]), int(parts[2])
        kind = parts[3] if len(parts) > 3 else "p2wpkh"
        if len(txid) != 64 or kind not in ("p2wpkh", "p2pkh") or len(parts) > 4:
            raise ValueError
    except (IndexError, ValueError):
        raise RequestError(f"--coin {text!r}: expected TXID:VOUT:SATS[:p2pkh]", code="field_invalid") from None
    script = p2wpkh_script(key.pub) if kind == "p2wpkh" else p2pkh_script(key.pub)
    return Coin(c.Outpoint(txid.lower(), vout), value, script, key)


def save_channel(path: Path, record: dict) -> None:
    """The channel's record (its client key: what proves the channel to the router) on disk,
    mode 0600, synced: like the refund, it must outlive this process."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(fd)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def run_pay(args: argparse.Namespace) -> int:
    portal = PortalClient(args.portal)
    offer = portal.offer()
    if args.chain_url:
        tip = make_backend(args.chain_kind, args.chain_url).tip_height
    else:
        # No chain of our own: the expiry can only be judged against the portal's tip.
        _warn("no --chain-url: the channel's expiry is judged against the router's own block height, "
              "trusting the router (a router that lies about it can lock the deposit for longer than "
              f"{PayerLimits().max_expiry_blocks} blocks); give --chain-url to check it against your own node "
              "or explorer")

        def tip() -> int:
            return int(portal.offer()["tip_height"])
    bounds = MeterBounds(max_bytes_per_second=int(args.max_link_mbps * 1_000_000 / 8))
    session = PayerSession(portal, tip, args.refund_address, feerate_sat_vb=args.feerate, bounds=bounds)
    key = parse_key(args.fund_key)
    coins = [parse_coin(text, key) for text in args.coin]
    _say(f"offer: {offer['network']}, {offer.get('tariff')}, prepay step {offer['prepay_step_sat']} sat")
    terms = session.open(args.deposit)
    channel_file = Path(args.channel_file or f"channel-{terms['channel_id']}.json")
    save_channel(channel_file, session.record())  # before any money moves: the key proves the channel
    _say(f"channel {terms['channel_id']}: deposit {args.deposit} sat to {terms['funding_address']}, "
         f"expiry {terms['expiry']}")
    _say(f"the channel's key (it proves the channel: keep it secret) saved to {channel_file}")
    refund_file = Path(args.refund_file or f"refund-{terms['channel_id']}.hex")
    funded = session.fund_from_coins(coins, p2wpkh_script(key.pub), refund_path=refund_file)
    _say(f"funding {funded['funding']} ({funded['state']}); refund transaction saved to {refund_file}")
    deadline = time.monotonic() + args.duration
    step = session.prepay_step  # the offer's, fixed at open: later answers never raise it
    ended = None
    refusal: ChannelError | None = None
    while time.monotonic() < deadline:
        try:
            if ended := _pay_round(session, step, args.session):
                break
        except ChannelError as e:
            if e.code != "owed_implausible":
                raise
            # The router asks for more than the meter's own figures can account for: no more
            # payments; close so that what was paid settles and the rest comes back.
            _say(f"refused: {e.code}: {e.message}")
            refusal = e
            break
        except (OSError, PortalError) as e:
            # The router restarting (procd respawns it) or a lost request: the channel and the
            # kernel's grant survive it, so keep going; a refusal of the channel itself ends it.
            if isinstance(e, PortalError) and e.http_status < 500:
                raise
            # e.g. storage_full: nothing was acknowledged; or a router restarting
            what = f"{e.code}: {e.message}" if isinstance(e, PortalError) else f"portal unreachable ({e})"
            _say(f"{what}; retrying")
        time.sleep(args.interval)
    if not args.no_close and ended != "closed":
        closed = session.close()
        _say(f"closed: state {closed['state']}, settlement {closed['settlement_txid']}")
    if refusal is not None:
        raise refusal  # the command fails with the refusal's code
    return 0


def _pay_round(session: PayerSession, step: int, ask_meter: bool) -> str | None:
    """One look at the meter and, when credit is below half a step, one payment. Says why
    there is nothing left to do ("spent": deposit paid and used; "closed": by the router)."""
    s = session.session() if ask_meter else None  # proven by the channel's key
    ch = session.channel
    assert ch is not None
    if s:
        _warn_concurrent_use(session, s.get("concurrent_use"))
    if s and s["state"] == "closed":
        _say(f"channel closed by the router ({s['channel_state']})")
        return "closed"
    if s and s.get("channel_id") != session.channel_id:
        s = None  # another channel of this address (an older one): not what we pay for
    owed = session.checked_owed(s) if s else 0  # never the router's word alone
    if ch.paid - owed < max(1, step // 2) and ch.paid < ch.deposit:
        answer = session.pay_for(owed)
        _say(f"paid {answer['paid']} sat (owed {owed}, used {s['bytes_used'] if s else 0} bytes / "
             f"{s['seconds_used'] if s else 0} s)")
    elif ch.paid >= ch.deposit and (owed >= ch.paid or (s and s["state"] == "exhausted")):
        _say("deposit used up")
        return "spent"
    return None


def _warn_concurrent_use(session: PayerSession, verdict: dict | None) -> None:
    """Says so, once per new sighting, when the router saw two devices answer for this one's
    addresses: a copy of its MAC and IP spending its credit (docs/security.md)."""
    times = verdict.get("times", 0) if isinstance(verdict, dict) and verdict.get("detected") else 0
    if times > session.concurrent_seen:
        session.concurrent_seen = times
        _say(f"concurrent use: {verdict.get('most_answers')} devices answered the router for this device's MAC and "
             f"IP ({times} times since {verdict.get('first_seen')}): another device may be using your credit; stop "
             "(your channel closes and settles) and use an encrypted (WPA3 OWE) network if there is one")


def run_close(args: argparse.Namespace) -> int:
    """`bitmesh close`: settle a channel `bitmesh pay` left open, proven by its saved key."""
    record = json.loads(Path(args.channel_file).read_text())
    key = CKey(bytes.fromhex(record["client_secret"]), compressed=True)
    portal = PortalClient(args.portal or record["portal"])
    closed = portal.close(record["channel_id"], sign_proof(key, "close", record["channel_id"]))
    _say(f"closed: state {closed['state']}, settlement {closed['settlement_txid']}")
    return 0


def add_parser(sub) -> None:
    pay = sub.add_parser("pay", help="pay a BitMesh portal from the command line")
    pay.add_argument("--portal", required=True, help="portal base URL, e.g. http://192.168.1.1:8088")
    pay.add_argument("--deposit", type=int, required=True, help="channel deposit in satoshis")
    pay.add_argument("--refund-address", required=True, help="where unused and refunded coins go")
    pay.add_argument("--fund-key", required=True, help="private key (hex or WIF) holding the coins")
    pay.add_argument("--coin", action="append", required=True, help="TXID:VOUT:SATS[:p2pkh] of that key")
    pay.add_argument("--refund-file", help="where to keep the signed refund (default refund-<id>.hex)")
    pay.add_argument("--channel-file", help="where to keep the channel's key, which proves the channel to the router "
                     "(to read its session, to close it later: `bitmesh close`; default channel-<id>.json, mode 0600)")
    pay.add_argument("--chain-url", help="your own node or explorer (Esplora or Core RPC URL), to check the "
                     "channel's expiry; without it the router's block height is trusted (a warning says so)")
    pay.add_argument("--chain-kind", choices=("core", "esplora"), default="esplora")
    pay.add_argument("--feerate", type=float, default=2.0, help="sat/vB for funding and refund")
    pay.add_argument("--duration", type=float, default=60.0, help="seconds to stay connected")
    pay.add_argument("--interval", type=float, default=1.0, help="seconds between session checks")
    pay.add_argument("--max-link-mbps", type=float, default=2400.0,
                     help="fastest this link can be (upload plus download): more usage than that in the time "
                     "since the first payment is not paid for")
    pay.add_argument("--no-session", dest="session", action="store_false",
                     help="do not ask the meter; pay one step at a time")
    pay.add_argument("--no-close", action="store_true",
                     help="leave the channel open (close it later with `bitmesh close --channel-file ...`)")
    pay.set_defaults(func=run_pay)
    close = sub.add_parser("close", help="close a channel `bitmesh pay` opened, proven by its saved key")
    close.add_argument("--channel-file", required=True, help="the channel file `bitmesh pay` wrote")
    close.add_argument("--portal", help="portal base URL (default: the one in the channel file)")
    close.set_defaults(func=run_close)
