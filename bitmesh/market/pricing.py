"""Demand pricing: the price of NEW channels follows load between the owner's floor and ceiling.

Pure integer arithmetic, no clock of its own (the caller passes the service clock in ms), so the
same inputs always give the same prices. A channel keeps the prices it opened with for its whole
life (bitmesh.tariff.tariff_of): nothing here touches an open channel.

Load is the number of paid clients now (open channels with a payment) over the owner's
`capacity_clients`: what a hotspot sells is a share of one radio and one uplink, and the number
of clients holding access is what divides them. It is read from the router's own state (no
traffic sample to game: a client cannot raise others' price by sending bytes), and it moves only
when somebody pays or leaves.

Each priced unit (sat_per_mb, sat_per_minute) has a band floor <= base <= ceiling, base being the
owner's configured price. The price the load asks for is piecewise linear: the floor with no
client, the base at the target load, the ceiling at full capacity (and beyond). The advertised
price moves towards it by at most `step_percent_per_minute` of the band per elapsed minute,
rounded down to whole satoshis (so a step below one satoshi waits until a whole one has built up).
Time only builds up while the price is on its way: whenever it reaches what the load asks for,
the clock of its allowance restarts, so an hour at rest never allows a jump across the band.
"""

from __future__ import annotations

from dataclasses import dataclass

MS_PER_MINUTE = 60_000
UNITS = ("sat_per_mb", "sat_per_minute")


@dataclass(frozen=True)
class Band:
    """One unit's prices: floor <= base <= ceiling, all whole satoshis (base 0: unit not sold)."""

    floor: int
    base: int
    ceiling: int

    @property
    def width(self) -> int:
        return self.ceiling - self.floor


@dataclass(frozen=True)
class DemandPricing:
    sat_per_mb: Band
    sat_per_minute: Band
    capacity_clients: int = 32
    target_load_percent: int = 70  # 1..99: load at which the base price applies
    step_percent_per_minute: int = 10  # 1..100: most a price moves per minute, in percent of its band

    def band(self, unit: str) -> Band:
        return self.sat_per_mb if unit == "sat_per_mb" else self.sat_per_minute


@dataclass(frozen=True)
class UnitState:
    price: int
    since_ms: int  # service clock from which this unit's step allowance counts


@dataclass(frozen=True)
class PriceState:
    sat_per_mb: UnitState
    sat_per_minute: UnitState

    def prices(self) -> tuple[int, int]:
        return self.sat_per_mb.price, self.sat_per_minute.price


def start_state(pricing: DemandPricing, now_ms: int) -> PriceState:
    """The owner's base prices (what a start or a reload begins from)."""
    return PriceState(UnitState(pricing.sat_per_mb.base, now_ms), UnitState(pricing.sat_per_minute.base, now_ms))


def desired_price(band: Band, clients: int, capacity: int, target_percent: int) -> int:
    """The price this load asks for: floor at 0 clients, base at the target load, ceiling at full
    capacity; never decreasing in `clients`."""
    load = max(0, clients) * 100  # in percent x capacity: compared without division
    target = target_percent * capacity
    if load <= target:
        return band.floor + (band.base - band.floor) * load // target
    full = 100 * capacity
    if load >= full:
        return band.ceiling
    return band.base + (band.ceiling - band.base) * (load - target) // (full - target)


def allowance(band: Band, step_percent: int, elapsed_ms: int) -> int:
    """The most the price may move after `elapsed_ms`: whole satoshis, rounded down."""
    return band.width * step_percent * max(0, elapsed_ms) // (100 * MS_PER_MINUTE)


def next_price(current: int, band: Band, clients: int, capacity: int, target_percent: int, step_percent: int,
               elapsed_ms: int) -> int:
    """The next price from `current` after `elapsed_ms` of movement allowance at this load: within
    [floor, ceiling], at most `allowance` away from `current` (a current price outside the band,
    which validation never lets happen, is first brought inside it)."""
    current = min(max(current, band.floor), band.ceiling)
    want = desired_price(band, clients, capacity, target_percent)
    room = allowance(band, step_percent, elapsed_ms)
    if want > current:
        return min(want, current + room)
    return max(want, current - room)


def step(pricing: DemandPricing, state: PriceState, clients: int, now_ms: int) -> PriceState:
    """The state after one evaluation at service time `now_ms` with `clients` paid clients."""
    units = {}
    for unit in UNITS:
        band, old = pricing.band(unit), getattr(state, unit)
        if band.base == 0:  # unit not sold: stays free
            units[unit] = UnitState(0, now_ms)
            continue
        price = next_price(old.price, band, clients, pricing.capacity_clients, pricing.target_load_percent,
                           pricing.step_percent_per_minute, now_ms - old.since_ms)
        want = desired_price(band, clients, pricing.capacity_clients, pricing.target_load_percent)
        # Moved, or nowhere to go: the allowance restarts. Held back by rounding: it keeps building.
        units[unit] = UnitState(price, now_ms if price != old.price or price == want else old.since_ms)
    return PriceState(**units)


def pricing_from_settings(settings) -> DemandPricing:
    """The owner's bands from validated Settings (bitmesh.config checks floor <= base <= ceiling)."""
    s = settings
    return DemandPricing(
        sat_per_mb=_band(s.price_floor_sat_per_mb, s.price_sat_per_mb, s.price_ceiling_sat_per_mb),
        sat_per_minute=_band(s.price_floor_sat_per_minute, s.price_sat_per_minute, s.price_ceiling_sat_per_minute),
        capacity_clients=s.capacity_clients,
        target_load_percent=s.demand_target_load_percent,
        step_percent_per_minute=s.demand_step_percent_per_minute,
    )


def _band(floor: int, base: int, ceiling: int) -> Band:
    return Band(floor, base, ceiling) if base else Band(0, 0, 0)
