"""Service settings: the `bitmesh.main` UCI section, typed and validated.

Every option is checked at start; the first bad one raises ConfigError (code config_invalid) whose
message names the option and what is wrong, so a half-configured gate never starts. The Bitcoin
Core RPC password never appears in repr/str of Settings nor in any error message.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bitmesh import uci
from bitmesh.chain.address import NETWORKS, address_to_script
from bitmesh.errors import BitMeshError, ConfigError

TYPE_CHECKING = False  # typing costs the router ~0.5 MB resident: its names are for the checker only
if TYPE_CHECKING:
    from typing import Any

MAX_SAT = 21_000_000 * 100_000_000
DUST_SAT = 546
CHAIN_BACKENDS = ("esplora", "core")
SECRET_OPTIONS = frozenset({"core_rpc_password", "mqtt_password"})
GARDEN_HOST_PORT = 443  # a walled_garden_host entry's port
ZERO_CONF_TOTAL_FACTOR = 5  # zero_conf_total_max_sat when unset: this many channels at the per-channel cap

_TRUE = {"1", "yes", "on", "true", "enabled"}
_FALSE = {"0", "no", "off", "false", "disabled"}
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_TOPIC_RE = re.compile(r"^[^#+\x00/]+(/[^#+\x00/]+)*$")


@dataclass(frozen=True)
class Settings:
    enabled: bool = False
    interface: str = "lan"
    network: str = "main"
    price_sat_per_mb: int = 1
    price_sat_per_minute: int = 10
    prepay_step_sat: int = 100
    min_deposit_sat: int = 5_000
    max_deposit_sat: int = 200_000
    expiry_blocks: int = 144
    settle_margin_blocks: int = 12
    zero_conf_max_sat: int = 20_000
    # Unconfirmed deposits in use at once, all channels together. Unset: ZERO_CONF_TOTAL_FACTOR
    # times zero_conf_max_sat (a config that raises the per-channel cap raises this with it).
    zero_conf_total_max_sat: int = 100_000
    min_conf: int = 1
    chain_backend: str = "esplora"
    esplora_url: str = "https://mempool.space/api"
    core_rpc_url: str = "http://127.0.0.1:8332"
    core_rpc_user: str = ""
    core_rpc_password: str = field(default="", repr=False)
    payout_address: str = ""
    state_dir: str = "/etc/bitmesh"
    portal_port: int = 8088
    portal_title: str = "BitMesh Wi-Fi"
    portal_text: str = "Pay as you go with bitcoin: only what you use, the rest comes back to you."
    walled_garden: tuple[str, ...] = ()  # host:port pairs unpaid clients may reach
    walled_garden_host: tuple[str, ...] = ()  # the older form: host means host:443 (HTTPS)
    mqtt_enabled: bool = False
    mqtt_broker: str = "127.0.0.1:1883"
    mqtt_topic_prefix: str = "bitmesh"
    mqtt_username: str = ""
    mqtt_password: str = field(default="", repr=False)
    mqtt_tls: bool = False  # TLS to the broker (mqtt_ca_file, or the system's CAs)
    mqtt_ca_file: str = ""
    fleet_nodes: tuple[str, ...] = ()  # the owner's node ids for the fleet view; empty = every node on the broker
    # Demand pricing (off by default; bitmesh/market/pricing.py): new channels' prices follow
    # the load (paid clients / capacity_clients) between floor and ceiling. 0 = unset.
    demand_pricing: bool = False
    price_floor_sat_per_mb: int = 0
    price_ceiling_sat_per_mb: int = 0
    price_floor_sat_per_minute: int = 0
    price_ceiling_sat_per_minute: int = 0
    demand_target_load_percent: int = 70
    demand_step_percent_per_minute: int = 10
    capacity_clients: int = 32  # paid clients this hotspot serves well at once
    # Uplink mode (resale, off by default; bitmesh/uplink/): the WAN is a client of another BitMesh
    # hotspot, paid from the owner-funded wallet; this hotspot resells at upstream x (1 + margin).
    uplink_enabled: bool = False
    uplink_portal: str = ""  # the upstream portal's URL; empty: the WAN's default gateway's, port 8088
    uplink_margin_percent: int = 20
    uplink_budget_sat: int = 0  # the most ever spent upstream, all uplink channels together
    uplink_deposit_sat: int = 50_000  # each uplink channel's deposit

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Settings:
        """Build and validate from option values: UCI strings or already-typed Python values.

        Missing options take the defaults above; unknown options are refused (typos in a config
        file must not pass silently).
        """
        unknown = sorted(set(values) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown option")
        kwargs: dict[str, Any] = {}
        for name, convert in _FIELDS.items():
            if name in values:
                kwargs[name] = convert(name, values[name])
        if "zero_conf_total_max_sat" not in kwargs:
            per_channel = kwargs.get("zero_conf_max_sat", cls.zero_conf_max_sat)
            kwargs["zero_conf_total_max_sat"] = min(MAX_SAT, ZERO_CONF_TOTAL_FACTOR * per_channel)
        settings = cls(**kwargs)
        settings._check()
        return settings

    def replace(self, **changes: Any) -> Settings:
        """A copy with some options changed, validated again."""
        merged = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        merged.update(changes)
        return Settings.from_dict(merged)

    def public_dict(self) -> dict[str, Any]:
        """Every option except secrets, for status output (ubus, LuCI, logs)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SECRET_OPTIONS}
        out["walled_garden"] = list(self.walled_garden)
        out["walled_garden_host"] = list(self.walled_garden_host)
        out["fleet_nodes"] = list(self.fleet_nodes)
        return out

    @property
    def garden(self) -> tuple[tuple[str, int], ...]:
        """The walled garden as (host, port) pairs: `walled_garden` entries, and each
        `walled_garden_host` as host:443 (what the older option was for: a block explorer's
        HTTPS API)."""
        pairs = [_split_host_port("walled_garden", e) for e in self.walled_garden]
        pairs += [(h, GARDEN_HOST_PORT) for h in self.walled_garden_host]
        return tuple(dict.fromkeys(pairs))

    @property
    def mqtt_host_port(self) -> tuple[str, int]:
        return _split_host_port("mqtt_broker", self.mqtt_broker)

    # --- cross-field rules -----------------------------------------------------------------

    def _check(self) -> None:
        if self.network not in NETWORKS:
            raise ConfigError(f"network: must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.price_sat_per_mb <= 0 and self.price_sat_per_minute <= 0:
            raise ConfigError("price_sat_per_mb: at least one of price_sat_per_mb and price_sat_per_minute must be > 0")
        if self.min_deposit_sat < DUST_SAT:
            raise ConfigError(
                f"min_deposit_sat: must be at least the dust limit {DUST_SAT}, got {self.min_deposit_sat}"
            )
        if self.max_deposit_sat < self.min_deposit_sat:
            raise ConfigError(
                f"max_deposit_sat: must be >= min_deposit_sat ({self.min_deposit_sat}), got {self.max_deposit_sat}"
            )
        if not 0 < self.prepay_step_sat <= self.min_deposit_sat:
            raise ConfigError(
                f"prepay_step_sat: must be > 0 and <= min_deposit_sat ({self.min_deposit_sat}), "
                f"got {self.prepay_step_sat}"
            )
        if self.expiry_blocks < 2:
            raise ConfigError(f"expiry_blocks: must be at least 2, got {self.expiry_blocks}")
        if not 1 <= self.settle_margin_blocks < self.expiry_blocks:
            raise ConfigError(
                f"settle_margin_blocks: must be >= 1 and < expiry_blocks ({self.expiry_blocks}), "
                f"got {self.settle_margin_blocks}"
            )
        if not 1 <= self.min_conf <= 100:
            raise ConfigError(f"min_conf: must be between 1 and 100, got {self.min_conf}")
        if self.chain_backend not in CHAIN_BACKENDS:
            raise ConfigError(f"chain_backend: must be one of {', '.join(CHAIN_BACKENDS)}, got {self.chain_backend!r}")
        if self.chain_backend == "esplora" and not self.esplora_url:
            raise ConfigError("esplora_url: required when chain_backend is esplora")
        if self.chain_backend == "core" and not self.core_rpc_url:
            raise ConfigError("core_rpc_url: required when chain_backend is core")
        if not self.payout_address and self.enabled:
            raise ConfigError("payout_address: required (the owner's bitcoin address that receives earnings)")
        try:
            if self.payout_address:  # may stay empty while the hotspot is off (a new install)
                address_to_script(self.payout_address, self.network)
        except BitMeshError:
            raise ConfigError(
                f"payout_address: {self.payout_address!r} is not a valid address for network {self.network!r}"
            ) from None
        if not 1 <= self.portal_port <= 65535:
            raise ConfigError(f"portal_port: must be between 1 and 65535, got {self.portal_port}")
        if self.mqtt_enabled:
            self.mqtt_host_port  # noqa: B018 - validates the broker address
        if self.mqtt_ca_file and not self.mqtt_tls:
            raise ConfigError("mqtt_ca_file: only used with mqtt_tls 1")
        self._check_demand_pricing()
        self._check_uplink()

    def _check_uplink(self) -> None:
        if self.uplink_margin_percent > 1000:
            raise ConfigError(f"uplink_margin_percent: must be between 0 and 1000, got {self.uplink_margin_percent}")
        if self.uplink_deposit_sat < DUST_SAT:
            raise ConfigError(f"uplink_deposit_sat: must be at least the dust limit {DUST_SAT}, "
                              f"got {self.uplink_deposit_sat}")
        if self.uplink_enabled and self.uplink_budget_sat <= 0:
            raise ConfigError("uplink_budget_sat: must be > 0 with uplink_enabled (the most spent upstream)")
        if self.uplink_enabled and self.demand_pricing:
            # Both would set the price of new channels: the resale price follows the upstream's
            # (docs/protocol.md, "Uplink mode"), the demand price the load.
            raise ConfigError("demand_pricing: must be 0 with uplink_enabled (both set the price of new channels)",
                              code="uplink_demand_pricing_exclusive")

    def _check_demand_pricing(self) -> None:
        if not 1 <= self.capacity_clients <= 100_000:
            raise ConfigError(f"capacity_clients: must be between 1 and 100000, got {self.capacity_clients}")
        if not 1 <= self.demand_target_load_percent <= 99:
            raise ConfigError(
                f"demand_target_load_percent: must be between 1 and 99, got {self.demand_target_load_percent}")
        if not 1 <= self.demand_step_percent_per_minute <= 100:
            raise ConfigError(f"demand_step_percent_per_minute: must be between 1 and 100, "
                              f"got {self.demand_step_percent_per_minute}")
        if not self.demand_pricing:
            return
        for unit in ("sat_per_mb", "sat_per_minute"):
            base = getattr(self, f"price_{unit}")
            floor, ceiling = getattr(self, f"price_floor_{unit}"), getattr(self, f"price_ceiling_{unit}")
            if not base:
                if floor or ceiling:
                    raise ConfigError(f"price_floor_{unit}: floor and ceiling must be 0 while price_{unit} is 0 "
                                      "(that unit is not sold)", code="price_band_invalid")
                continue
            if floor <= 0:
                raise ConfigError(f"price_floor_{unit}: must be > 0 with demand_pricing on (price_{unit} is {base})",
                                  code="price_band_invalid")
            if floor > base:
                raise ConfigError(f"price_floor_{unit}: must be <= price_{unit} ({base}), got {floor}",
                                  code="price_band_invalid")
            if ceiling < base:
                raise ConfigError(f"price_ceiling_{unit}: must be >= price_{unit} ({base}), got {ceiling}",
                                  code="price_band_invalid")


# --- converters: (option name, raw value) -> typed value ----------------------------------------


def _scalar(name: str, value: Any) -> Any:
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise ConfigError(f"{name}: expected one value, got a list of {len(value)}")
        return value[0]
    return value


def _bool(name: str, value: Any) -> bool:
    value = _scalar(name, value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConfigError(f"{name}: expected a boolean (0/1), got {value!r}")


def _amount(name: str, value: Any) -> int:
    value = _scalar(name, value)
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a non-negative whole number, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.strip().isdecimal() and value.strip().isascii():
        n = int(value.strip())
    else:
        raise ConfigError(f"{name}: expected a non-negative whole number, got {value!r}")
    if n < 0:
        raise ConfigError(f"{name}: must not be negative, got {n}")
    if n > MAX_SAT:
        raise ConfigError(f"{name}: too large, got {n}")
    return n


def _text(max_len: int, allow_empty: bool = True) -> Callable[[str, Any], str]:
    def convert(name: str, value: Any) -> str:
        value = _scalar(name, value)
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected text")
        if not allow_empty and not value.strip():
            raise ConfigError(f"{name}: must not be empty")
        if len(value) > max_len:
            raise ConfigError(f"{name}: longer than {max_len} characters")
        if any(ord(ch) < 32 and ch not in "\n\t" for ch in value):
            raise ConfigError(f"{name}: contains control characters")
        return value

    return convert


def _secret(name: str, value: Any) -> str:
    value = _scalar(name, value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected text")  # never echo a secret
    if len(value) > 1024 or any(ord(ch) < 32 for ch in value):
        raise ConfigError(f"{name}: not an acceptable password (length or control characters)")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def convert(name: str, value: Any) -> str:
        value = _scalar(name, value)
        if value not in options:
            raise ConfigError(f"{name}: must be one of {', '.join(options)}, got {value!r}")
        return value

    return convert


def _interface(name: str, value: Any) -> str:
    value = _scalar(name, value)
    if not isinstance(value, str) or not _IFACE_RE.match(value):
        raise ConfigError(f"{name}: expected an interface name like 'lan', got {value!r}")
    return value


def _url(name: str, value: Any) -> str:
    value = _scalar(name, value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a URL")
    if value == "":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: must be an http:// or https:// URL, got {value!r}")
    if parts.username is not None or parts.password is not None:
        # never echo the URL: it holds credentials
        raise ConfigError(f"{name}: must not contain credentials; use core_rpc_user/core_rpc_password")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"{name}: invalid port in {value!r}") from None
    if any(ch.isspace() for ch in value):
        raise ConfigError(f"{name}: must not contain spaces")
    return value


def _abs_path(name: str, value: Any) -> str:
    value = _scalar(name, value)
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise ConfigError(f"{name}: expected an absolute path, got {value!r}")
    parts = Path(value).parts
    if ".." in parts:
        raise ConfigError(f"{name}: must not contain '..', got {value!r}")
    return value


def _optional_path(name: str, value: Any) -> str:
    return "" if _scalar(name, value) == "" else _abs_path(name, value)


def _port(name: str, value: Any) -> int:
    n = _amount(name, value)
    if not 1 <= n <= 65535:
        raise ConfigError(f"{name}: must be between 1 and 65535, got {n}")
    return n


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.match(host))


def _hosts(name: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not _is_host(item):
            raise ConfigError(f"{name}: expected a host name or IP address, got {item!r}")
        out.append(item.lower())
    return tuple(out)


def _host_ports(name: str, value: Any) -> tuple[str, ...]:
    """A list of host:port ([IPv6]:port): the walled garden."""
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{name}: expected host:port, got {item!r}")
        host, port = _split_host_port(name, item)
        out.append(f"[{host.lower()}]:{port}" if ":" in host else f"{host.lower()}:{port}")
    return tuple(out)


def _node_ids(name: str, value: Any) -> tuple[str, ...]:
    """A list of node ids (16 lower-case hex digits, bitmesh.market.identity), no duplicates."""
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not re.fullmatch(r"[0-9A-Fa-f]{16}", item):
            raise ConfigError(f"{name}: expected a node id (16 hex digits), got {item!r}")
        if item.lower() not in out:
            out.append(item.lower())
    return tuple(out)


def _split_host_port(name: str, value: str) -> tuple[str, int]:
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(r"^([^:\[\]]+):(\d+)$", value)
    if not m or not _is_host(m.group(1)) or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"{name}: expected host:port (e.g. 127.0.0.1:1883 or [::1]:1883), got {value!r}")
    return m.group(1), int(m.group(2))


def _broker(name: str, value: Any) -> str:
    value = _scalar(name, value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected host:port")
    _split_host_port(name, value)
    return value


def _topic(name: str, value: Any) -> str:
    value = _scalar(name, value)
    if not isinstance(value, str) or not _TOPIC_RE.match(value) or len(value) > 200:
        raise ConfigError(f"{name}: expected an MQTT topic prefix without wildcards, like 'bitmesh', got {value!r}")
    return value


def _nonempty_choice_network(name: str, value: Any) -> str:
    return _choice(tuple(NETWORKS))(name, value)


_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "enabled": _bool,
    "interface": _interface,
    "network": _nonempty_choice_network,
    "price_sat_per_mb": _amount,
    "price_sat_per_minute": _amount,
    "prepay_step_sat": _amount,
    "min_deposit_sat": _amount,
    "max_deposit_sat": _amount,
    "expiry_blocks": _amount,
    "settle_margin_blocks": _amount,
    "zero_conf_max_sat": _amount,
    "zero_conf_total_max_sat": _amount,
    "min_conf": _amount,
    "chain_backend": _choice(CHAIN_BACKENDS),
    "esplora_url": _url,
    "core_rpc_url": _url,
    "core_rpc_user": _text(256),
    "core_rpc_password": _secret,
    "payout_address": _text(128),
    "state_dir": _abs_path,
    "portal_port": _port,
    "portal_title": _text(120, allow_empty=False),
    "portal_text": _text(2000),
    "walled_garden": _host_ports,
    "walled_garden_host": _hosts,
    "mqtt_enabled": _bool,
    "mqtt_broker": _broker,
    "mqtt_topic_prefix": _topic,
    "mqtt_username": _text(256),
    "mqtt_password": _secret,
    "mqtt_tls": _bool,
    "mqtt_ca_file": _optional_path,
    "fleet_nodes": _node_ids,
    "demand_pricing": _bool,
    "price_floor_sat_per_mb": _amount,
    "price_ceiling_sat_per_mb": _amount,
    "price_floor_sat_per_minute": _amount,
    "price_ceiling_sat_per_minute": _amount,
    "demand_target_load_percent": _amount,
    "demand_step_percent_per_minute": _amount,
    "capacity_clients": _amount,
    "uplink_enabled": _bool,
    "uplink_portal": _url,
    "uplink_margin_percent": _amount,
    "uplink_budget_sat": _amount,
    "uplink_deposit_sat": _amount,
}
assert set(_FIELDS) == {f.name for f in dataclasses.fields(Settings)}

SECTION_TYPE = "bitmesh"
SECTION_NAME = "main"


def load_settings(path: str | Path) -> Settings:
    """Read the UCI file at `path` and return its validated `bitmesh.main` settings."""
    pkg = uci.load(path)
    section = pkg.section(SECTION_NAME)
    if section is None or section.type != SECTION_TYPE:
        candidates = pkg.sections_of(SECTION_TYPE)
        if not candidates:
            raise ConfigError(f"{path}: no 'config {SECTION_TYPE} {SECTION_NAME!r}' section")
        section = candidates[0]
    return Settings.from_dict(section.values)
