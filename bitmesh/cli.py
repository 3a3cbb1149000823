"""`bitmesh` command line: `bitmesh serve` runs the service (procd starts it this way)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bitmesh.errors import BitMeshError


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return host.strip("[]"), int(port)


def _serve(args: argparse.Namespace) -> int:
    from bitmesh.config import load_settings
    from bitmesh.memory import tune_allocator

    tune_allocator()  # before the service's threads start
    from bitmesh.service import build_service

    settings = load_settings(args.config)
    if not settings.enabled:
        print("bitmesh: disabled (set bitmesh.main.enabled=1)", file=sys.stderr)
        return 0
    service = build_service(settings, listen=args.listen, watch_interval=args.watch_interval,
                            firewall=not args.no_firewall, config_path=Path(args.config), ubus=not args.no_ubus,
                            ubus_socket=args.ubus_socket, pricing_interval=args.pricing_interval)
    service.run()
    return 0


def _command(argv: list[str]) -> str | None:
    """The subcommand `argv` names: its first word that is not an option (the only global
    option, -v, takes no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitmesh", description="Pay-as-you-go Wi-Fi for bitcoin")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the hotspot service")
    serve.add_argument("--config", default="/etc/config/bitmesh", help="UCI config file")
    serve.add_argument("--listen", type=_host_port, action="append",
                       help="portal HOST:PORT, repeatable (default: the LAN addresses, portal_port)")
    serve.add_argument("--no-firewall", action="store_true",
                       help="development only: serve the channel API without gating or metering anybody; "
                            "nothing is measured, so every satoshi paid is owed and settled (owed = paid), "
                            "as the offer states (\"metered\": false)")
    serve.add_argument("--no-ubus", action="store_true",
                       help="do not register the `bitmesh` ubus objects (no ubusd here)")
    serve.add_argument("--ubus-socket", metavar="PATH",
                       help="ubusd's socket (default: libubus's, /var/run/ubus/ubus.sock)")
    serve.add_argument("--watch-interval", type=float, default=30.0, help="seconds between chain checks")
    # Tests only (hidden, never in UCI): demand pricing passes more often than once a minute; the
    # step limit stays per minute of the service clock.
    serve.add_argument("--pricing-interval", type=float, default=60.0, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)
    argv = sys.argv[1:] if argv is None else argv
    if _command(argv) != "serve":
        # The payer's side (wallet, portal client, `bitmesh pay`/`close`) stays out of the
        # service's memory: the router runs `serve` only (tests/test_memory_netns.py).
        from bitmesh.market.browse import add_fleet_parser
        from bitmesh.market.browse import add_parser as add_offers
        from bitmesh.paycli import add_parser as add_pay

        add_pay(sub)
        add_offers(sub)  # `bitmesh offers`: paho is imported only when it runs
        add_fleet_parser(sub)  # `bitmesh fleet`: likewise
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except BitMeshError as e:
        print(f"bitmesh: {e.code}: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
