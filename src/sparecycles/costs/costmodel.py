"""The cost model: what the platform pays that the ledger does not see, read from TOML. Pure.

The ledger sees every owner earning and every cost booked with ``Ledger.record_cost``. Servers,
storage, egress, the platform's own hardware, the energy it draws and the people who keep serving
running are paid outside it; this file says what they cost. ``examples/costs.toml`` documents every
key and docs/costs.md the method. Amounts are decimal strings of the currency (``"120.00"``), read
exactly into integer micro-units; quantities (GB, hours, PUE, shares) are decimals. An unknown key
is refused, so a typo is an error, not a cost silently left out.

``parse_cost_model`` turns the parsed TOML into a ``CostModel`` (pure); ``load_cost_model`` reads
the file (``--model-file``, else ``$SPARECYCLES_COST_MODEL``, else the shipped example).
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sparecycles.errors import InvalidRequest
from sparecycles.ledger.pricing import amount_micros_max, currency_pattern, parse_money
from sparecycles.types import Workload

WORKLOADS: tuple[str, ...] = tuple(w.value for w in Workload)  # inference, training, rnd
entries_max = 1000  # servers, storage tiers, hardware items or people in one file
share_scale = 1_000_000  # shares are read as decimals and kept as integers of millionths
seconds_per_year = 365 * 86_400  # a useful life in years is 365-day years
name_chars_max = 200
ENV_VAR = "SPARECYCLES_COST_MODEL"
SHIPPED_EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "costs.toml"

Shares = Mapping[str, int]  # workload -> weight (integers; only their ratios matter)


@dataclass(frozen=True, slots=True)
class Server:
    """A machine paid by time: the coordinator, web servers, a storage server."""

    name: str
    role: str = "other"  # coordinator | web | storage | other (only for the report)
    per_month_micros: int = 0
    per_hour_micros: int = 0
    shares: Shares | None = None  # None: split by measured node-seconds per workload


@dataclass(frozen=True, slots=True)
class Storage:
    """Disks that hold model weights and datasets, paid per GB-month of a tier."""

    name: str
    tier: str
    gb: Decimal
    price_per_gb_month_micros: int
    shares: Shares | None = None


@dataclass(frozen=True, slots=True)
class Hardware:
    """A device the platform owns: depreciated straight-line from purchase over its useful life
    to its salvage value. With ``node_id`` it serves as that node: its busy seconds carry the
    depreciation and its energy, the rest of its time is idle capacity. Without, it is shared
    infrastructure (split like a server)."""

    name: str
    price_micros: int
    salvage_micros: int
    purchased_s: float  # midnight UTC of the purchase date
    life_s: int
    node_id: str | None = None
    power_idle_w: float | None = None  # None: the node's profile says
    shares: Shares | None = None

    def depreciation_per_hour_micros(self) -> Decimal:
        return Decimal(self.price_micros - self.salvage_micros) * 3600 / self.life_s


@dataclass(frozen=True, slots=True)
class Person:
    """Someone paid by the hour, with the share of their time spent on each activity."""

    name: str
    hours: Decimal
    rate_per_hour_micros: int
    shares: Shares
    role: str = ""


@dataclass(frozen=True, slots=True)
class EnergyPrice:
    """What the platform pays for the energy its own hardware draws (not the owners' tariff)."""

    price_per_kwh_micros: int = 150_000
    pue: Decimal = Decimal("1.0")  # facility power (cooling, conversion) per unit of IT power


@dataclass(frozen=True, slots=True)
class Egress:
    """Network egress. ``gb`` from the provider's bill when known; otherwise estimated as the
    tokens sent to clients times ``bytes_per_token`` (a streamed token is one SSE event)."""

    price_per_gb_micros: int = 0
    gb: Decimal | None = None
    bytes_per_token: int = 200


@dataclass(frozen=True, slots=True)
class OwnerHardware:
    """An owner's device: its price and its life in busy hours, for the wear of sharing it."""

    price_micros: int
    life_hours: int


# Documented defaults for owner economics when a node does not report its own figures (docs/
# costs.md): a rough system price per device class and the hours of full load it lasts.
DEFAULT_OWNER_HARDWARE: dict[str, OwnerHardware] = {
    "gaming-pc": OwnerHardware(1_500_000_000, 30_000),  # $1,500; GPU and PSU wear first
    "desktop": OwnerHardware(800_000_000, 30_000),
    "laptop": OwnerHardware(1_200_000_000, 20_000),  # battery and fans wear faster
    "car": OwnerHardware(2_000_000_000, 40_000),  # the compute module, rated for automotive use
    "server": OwnerHardware(10_000_000_000, 50_000),
    "datacenter-gpu": OwnerHardware(30_000_000_000, 43_800),  # five years of full load
}
DEFAULT_OWNER_TARIFF_MICROS_PER_KWH = 200_000  # $0.20/kWh, a typical household tariff


@dataclass(frozen=True, slots=True)
class OwnerDefaults:
    electricity_price_per_kwh_micros: int = DEFAULT_OWNER_TARIFF_MICROS_PER_KWH
    hardware: Mapping[str, OwnerHardware] = field(
        default_factory=lambda: dict(DEFAULT_OWNER_HARDWARE))
    fallback: OwnerHardware = OwnerHardware(1_000_000_000, 30_000)

    def hardware_of(self, device_class: str) -> OwnerHardware:
        return self.hardware.get(device_class, self.fallback)


@dataclass(frozen=True, slots=True)
class CostModel:
    currency: str = "USD"
    energy: EnergyPrice = EnergyPrice()
    egress: Egress = Egress()
    servers: tuple[Server, ...] = ()
    storage: tuple[Storage, ...] = ()
    hardware: tuple[Hardware, ...] = ()
    people: tuple[Person, ...] = ()
    platform_owner_ids: frozenset[str] = frozenset()  # their earnings stay inside the company
    variable_ledger_categories: frozenset[str] = frozenset({"payment_fees"})
    owners: OwnerDefaults = OwnerDefaults()
    invoice_issuer: str = "sparecycles"
    provider: str = "sparecycles"
    source: str = "(built-in defaults)"


# ---- parsing -----------------------------------------------------------------------------------


def _keys(d: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise InvalidRequest(f"{where} must be a table")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise InvalidRequest(f"{where}: unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(allowed))}")
    return d


def _money(d: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    if key not in d:
        if default is None:
            raise InvalidRequest(f"{where}: {key} is required")
        return default
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRequest(f"{where}.{key}: an amount like \"12.50\", got {value!r}")
    try:
        return parse_money(str(value))
    except InvalidRequest as exc:
        raise InvalidRequest(f"{where}.{key}: {exc.message}") from None


def _decimal(d: Mapping[str, Any], key: str, where: str, default: Decimal | None = None,
             *, positive: bool = False) -> Decimal:
    if key not in d:
        if default is None:
            raise InvalidRequest(f"{where}: {key} is required")
        return default
    value = d[key]
    try:
        if isinstance(value, bool):
            raise InvalidOperation
        out = Decimal(str(value))
    except InvalidOperation:
        raise InvalidRequest(f"{where}.{key}: a number, got {value!r}") from None
    if not out.is_finite() or out < 0 or (positive and out == 0) or out > amount_micros_max:
        raise InvalidRequest(f"{where}.{key}: a {'positive' if positive else 'non-negative'} "
                             f"number, got {value!r}")
    return out


def _name(d: Mapping[str, Any], where: str, key: str = "name", default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str) or not 0 < len(value) <= name_chars_max:
        raise InvalidRequest(f"{where}: {key} is a string of 1-{name_chars_max} characters")
    return value


def _shares(value: Any, where: str, *, required: bool = False) -> Shares | None:
    if value is None:
        if required:
            raise InvalidRequest(f"{where}: shares are required, e.g. "
                                 "{ inference = 70, training = 30 }")
        return None
    table = _keys(value, set(WORKLOADS), f"{where}.shares")
    out: dict[str, int] = {}
    for k in WORKLOADS:
        if k in table:
            scaled = _decimal(table, k, f"{where}.shares") * share_scale
            if scaled != scaled.to_integral_value():
                raise InvalidRequest(f"{where}.shares.{k}: at most 6 decimal places")
            out[k] = int(scaled)
    if sum(out.values()) <= 0:
        raise InvalidRequest(f"{where}.shares: at least one share must be positive")
    return out


def _date_s(value: Any, where: str) -> float:
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value)
        except ValueError:
            raise InvalidRequest(f"{where}: a date like 2026-01-31, got {value!r}") from None
    if not isinstance(value, dt.date):
        raise InvalidRequest(f"{where}: a date like 2026-01-31, got {value!r}")
    return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    items = doc.get(key, [])
    if not isinstance(items, list) or len(items) > entries_max:
        raise InvalidRequest(f"[[{key}]] must be an array of at most {entries_max} tables")
    return items


def _server(d: Any, i: int) -> Server:
    where = f"servers[{i}]"
    d = _keys(d, {"name", "role", "per_month", "per_hour", "shares"}, where)
    if ("per_month" in d) == ("per_hour" in d):
        raise InvalidRequest(f"{where}: give per_month or per_hour (one of them)")
    return Server(_name(d, where), _name(d, where, "role", "other"),
                  _money(d, "per_month", where, 0), _money(d, "per_hour", where, 0),
                  _shares(d.get("shares"), where))


def _storage(d: Any, i: int) -> Storage:
    where = f"storage[{i}]"
    d = _keys(d, {"name", "tier", "gb", "price_per_gb_month", "shares"}, where)
    return Storage(_name(d, where), _name(d, where, "tier", "standard"), _decimal(d, "gb", where),
                   _money(d, "price_per_gb_month", where), _shares(d.get("shares"), where))


def _hardware(d: Any, i: int) -> Hardware:
    where = f"hardware[{i}]"
    d = _keys(d, {"name", "node_id", "price", "salvage", "purchased", "life_years", "life_hours",
                  "power_idle_w", "shares"}, where)
    if ("life_years" in d) == ("life_hours" in d):
        raise InvalidRequest(f"{where}: give life_years or life_hours (one of them)")
    life_s = (_decimal(d, "life_years", where, positive=True) * seconds_per_year
              if "life_years" in d else _decimal(d, "life_hours", where, positive=True) * 3600)
    price, salvage = _money(d, "price", where), _money(d, "salvage", where, 0)
    if salvage > price:
        raise InvalidRequest(f"{where}: salvage value above the price")
    if "purchased" not in d:
        raise InvalidRequest(f"{where}: purchased (a date) is required")
    node = d.get("node_id")
    if node is not None and (not isinstance(node, str) or not node):
        raise InvalidRequest(f"{where}.node_id: a node id")
    idle = None if "power_idle_w" not in d else float(_decimal(d, "power_idle_w", where))
    return Hardware(_name(d, where), price, salvage, _date_s(d["purchased"], f"{where}.purchased"),
                    max(1, int(life_s)), node, idle, _shares(d.get("shares"), where))


def _person(d: Any, i: int) -> Person:
    where = f"people[{i}]"
    d = _keys(d, {"name", "role", "hours", "rate_per_hour", "shares"}, where)
    return Person(_name(d, where), _decimal(d, "hours", where), _money(d, "rate_per_hour", where),
                  _shares(d.get("shares"), where, required=True) or {},
                  str(d.get("role", "")))


def _owners(d: Any) -> OwnerDefaults:
    d = _keys(d, {"electricity_price_per_kwh", "hardware"}, "[owners]")
    hw = dict(DEFAULT_OWNER_HARDWARE)
    table = d.get("hardware", {})
    if not isinstance(table, Mapping):
        raise InvalidRequest("[owners.hardware] must be a table of device classes")
    for cls, spec in table.items():
        where = f"owners.hardware.{cls}"
        spec = _keys(spec, {"price", "life_hours"}, where)
        hw[cls] = OwnerHardware(_money(spec, "price", where),
                                int(_decimal(spec, "life_hours", where, positive=True)))
    return OwnerDefaults(_money(d, "electricity_price_per_kwh", "[owners]",
                                DEFAULT_OWNER_TARIFF_MICROS_PER_KWH), hw)


def parse_cost_model(doc: Mapping[str, Any], source: str = "(inline)") -> CostModel:
    """A validated ``CostModel`` from a parsed TOML document. Raises InvalidRequest."""
    doc = _keys(doc, {"currency", "platform", "energy", "egress", "servers", "storage",
                      "hardware", "people", "ledger", "owners"}, "the cost model")
    currency = str(doc.get("currency", "USD"))
    if not currency_pattern.match(currency):
        raise InvalidRequest(f"currency must be a code like USD, got {currency!r}")
    plat = _keys(doc.get("platform", {}), {"owner_ids", "invoice_issuer", "provider"},
                 "[platform]")
    en = _keys(doc.get("energy", {}), {"price_per_kwh", "pue"}, "[energy]")
    eg = _keys(doc.get("egress", {}), {"price_per_gb", "gb", "bytes_per_token"}, "[egress]")
    led = _keys(doc.get("ledger", {}), {"variable_categories"}, "[ledger]")
    pue = _decimal(en, "pue", "[energy]", Decimal("1.0"))
    if pue < 1:
        raise InvalidRequest("[energy] pue is at least 1.0 (facility power over IT power)")
    owner_ids = plat.get("owner_ids", [])
    variable = led.get("variable_categories", ["payment_fees"])
    for what, items in (("[platform] owner_ids", owner_ids),
                        ("[ledger] variable_categories", variable)):
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise InvalidRequest(f"{what} must be a list of strings")
    servers = tuple(_server(d, i) for i, d in enumerate(_list(doc, "servers")))
    hardware = tuple(_hardware(d, i) for i, d in enumerate(_list(doc, "hardware")))
    for kind, items in (("servers", servers), ("hardware", hardware)):
        names = [x.name for x in items]
        if len(names) != len(set(names)):
            raise InvalidRequest(f"[[{kind}]] names must be unique")
    return CostModel(
        currency=currency,
        energy=EnergyPrice(_money(en, "price_per_kwh", "[energy]", 150_000), pue),
        egress=Egress(_money(eg, "price_per_gb", "[egress]", 0),
                      _decimal(eg, "gb", "[egress]") if "gb" in eg else None,
                      int(_decimal(eg, "bytes_per_token", "[egress]", Decimal(200)))),
        servers=servers,
        storage=tuple(_storage(d, i) for i, d in enumerate(_list(doc, "storage"))),
        hardware=hardware,
        people=tuple(_person(d, i) for i, d in enumerate(_list(doc, "people"))),
        platform_owner_ids=frozenset(owner_ids),
        variable_ledger_categories=frozenset(variable),
        owners=_owners(doc.get("owners", {})),
        invoice_issuer=_name(plat, "[platform]", "invoice_issuer", "sparecycles"),
        provider=_name(plat, "[platform]", "provider", "sparecycles"),
        source=source,
    )


def cost_model_path(path: Path | str | None = None) -> Path | None:
    """The file to read: ``path``, else ``$SPARECYCLES_COST_MODEL``, else the shipped example
    (when this is a source checkout), else None (built-in defaults: no costs outside the ledger)."""
    if path:
        return Path(path)
    if env := os.environ.get(ENV_VAR):
        return Path(env)
    return SHIPPED_EXAMPLE if SHIPPED_EXAMPLE.is_file() else None


def load_cost_model(path: Path | str | None = None) -> CostModel:
    """Read and validate the cost model (see ``cost_model_path`` for which file)."""
    chosen = cost_model_path(path)
    if chosen is None:
        return CostModel()
    try:
        with open(chosen, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{chosen}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot read the cost model {chosen}: {exc.strerror}") from None
    return parse_cost_model(doc, str(chosen))
