"""The cost model: what the platform pays that the ledger does not see, read from TOML. Pure.

The ledger sees every owner earning and every cost booked with ``Ledger.record_cost``. Servers,
storage, egress, the platform's own hardware, the energy it draws and the people who keep serving
running are paid outside it; this file says what they cost. ``examples/costs.toml`` documents every
key and docs/costs.md the method. Amounts are decimal strings of the currency (``"120.00"``), read
exactly into integer micro-units; quantities (GB, hours, PUE, shares) are decimals. An unknown key
is refused, so a typo is an error, not a cost silently left out.

**History does not change.** Every rate has an effective date: an entry of ``[[servers]]``,
``[[storage]]``, ``[[hardware]]`` or ``[[people]]`` says ``from`` (and may say ``until``), and
``[energy]``, ``[egress]`` and ``[ledger]`` may be arrays of tables with a ``from`` each. Entries
with the same name are the versions of one rate. Rates change on the first day of a month (a
month has one rate), so ``from`` and ``until`` are first days of months. ``CostModel.for_period``
gives the model in effect in a month; a new version dated next month leaves every earlier month
as it was. An entry without ``from`` applies since always (write one: it is what keeps a later
edit out of the past).

``parse_cost_model`` turns the parsed TOML into a ``CostModel`` (pure); ``load_cost_model`` reads
the file (``--model-file``, else ``$SPARECYCLES_COST_MODEL``, else the shipped example).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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
ALWAYS_S = float("-inf")  # the ``from`` of an undated entry
NEVER_S = float("inf")  # the ``until`` of an entry still in effect


@dataclass(frozen=True, slots=True)
class Server:
    """A machine paid by time: the coordinator, web servers, a storage server."""

    name: str
    role: str = "other"  # coordinator | web | storage | other (only for the report)
    per_month_micros: int = 0
    per_hour_micros: int = 0
    shares: Shares | None = None  # None: split by measured node-seconds per workload
    from_s: float = ALWAYS_S  # in effect from this month (its first day, UTC) ...
    until_s: float = NEVER_S  # ... until the month that begins here (exclusive)


@dataclass(frozen=True, slots=True)
class Storage:
    """Disks that hold model weights and datasets, paid per GB-month of a tier."""

    name: str
    tier: str
    gb: Decimal
    price_per_gb_month_micros: int
    shares: Shares | None = None
    from_s: float = ALWAYS_S
    until_s: float = NEVER_S


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
    from_s: float = ALWAYS_S
    until_s: float = NEVER_S

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
    from_s: float = ALWAYS_S
    until_s: float = NEVER_S


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
    # Dated versions of the single-valued rates: (from_s, value), oldest first. Empty: the
    # field above applies since always.
    energy_history: tuple[tuple[float, EnergyPrice], ...] = ()
    egress_history: tuple[tuple[float, Egress], ...] = ()
    variable_history: tuple[tuple[float, frozenset[str]], ...] = ()

    def for_period(self, start_s: float) -> CostModel:
        """The model in effect in the month that begins at ``start_s``: the entries whose
        ``[from, until)`` holds that instant, and the single rates of their latest version
        dated on or before it. Pure; calling it twice changes nothing."""

        def live(items: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(x for x in items if x.from_s <= start_s < x.until_s)

        def pick(history: tuple[tuple[float, Any], ...], default: Any) -> Any:
            chosen = [v for f, v in history if f <= start_s]
            return chosen[-1] if chosen else (default if not history else None)

        energy = pick(self.energy_history, self.energy) or EnergyPrice(0, Decimal("1.0"))
        egress = pick(self.egress_history, self.egress) or Egress()
        variable = pick(self.variable_history, self.variable_ledger_categories)
        return replace(self, servers=live(self.servers), storage=live(self.storage),
                       hardware=live(self.hardware), people=live(self.people),
                       energy=energy, egress=egress,
                       variable_ledger_categories=(frozenset({"payment_fees"})
                                                   if variable is None else variable),
                       energy_history=(), egress_history=(), variable_history=())


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


def _month_start_s(value: Any, where: str) -> float:
    """A ``from``/``until`` date: the first day of a month (rates change at month boundaries,
    so that a month has one rate and a closed month never sees a later one)."""
    t = _date_s(value, where)
    day = dt.datetime.fromtimestamp(t, dt.UTC)
    if day.day != 1:
        raise InvalidRequest(f"{where}: rates change on the first day of a month, got "
                             f"{day.date().isoformat()}")
    return t


def _effective(d: Mapping[str, Any], where: str) -> dict[str, float]:
    from_s = _month_start_s(d["from"], f"{where}.from") if "from" in d else ALWAYS_S
    until_s = _month_start_s(d["until"], f"{where}.until") if "until" in d else NEVER_S
    if not from_s < until_s:
        raise InvalidRequest(f"{where}: until is not after from")
    return {"from_s": from_s, "until_s": until_s}


def _versions(items: tuple[Any, ...], kind: str) -> None:
    """Entries sharing a name are versions of one rate: their spans must not overlap."""
    by: dict[str, list[Any]] = {}
    for x in items:
        by.setdefault(x.name, []).append(x)
    for name, vs in by.items():
        vs.sort(key=lambda x: x.from_s)
        for a, b in itertools.pairwise(vs):
            if a.from_s == b.from_s:
                raise InvalidRequest(f"[[{kind}]] {name!r}: two versions from the same month "
                                     "(names are unique; versions of a rate differ in from)")
            if b.from_s < a.until_s:
                if a.until_s == NEVER_S:
                    # an open-ended version ends where the next one begins
                    continue
                raise InvalidRequest(f"[[{kind}]] {name!r}: two versions in effect at once")


def _close_versions(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """An open-ended version of a rate ends where its next version begins."""
    out = []
    for x in items:
        later = [y.from_s for y in items if y.name == x.name and y.from_s > x.from_s]
        out.append(replace(x, until_s=min([x.until_s, *later])))
    return tuple(out)


def _dated_tables(doc: Mapping[str, Any], key: str, allowed: set[str]
                  ) -> list[tuple[float, Mapping[str, Any]]]:
    """``[key]`` (one table) or ``[[key]]`` (dated versions): (from_s, table), oldest first."""
    raw = doc.get(key, {})
    tables = raw if isinstance(raw, list) else [raw]
    if len(tables) > entries_max:
        raise InvalidRequest(f"[[{key}]]: at most {entries_max} versions")
    out = []
    for i, t in enumerate(tables):
        where = f"[{key}]" if not isinstance(raw, list) else f"{key}[{i}]"
        t = _keys(t, allowed | {"from"}, where)
        out.append((_month_start_s(t["from"], f"{where}.from") if "from" in t else ALWAYS_S, t))
    out.sort(key=lambda kv: kv[0])
    if len({f for f, _ in out}) != len(out):
        raise InvalidRequest(f"[[{key}]]: two versions from the same month")
    return out


def _list(doc: Mapping[str, Any], key: str) -> list[Any]:
    items = doc.get(key, [])
    if not isinstance(items, list) or len(items) > entries_max:
        raise InvalidRequest(f"[[{key}]] must be an array of at most {entries_max} tables")
    return items


def _server(d: Any, i: int) -> Server:
    where = f"servers[{i}]"
    d = _keys(d, {"name", "role", "per_month", "per_hour", "shares", "from", "until"}, where)
    if ("per_month" in d) == ("per_hour" in d):
        raise InvalidRequest(f"{where}: give per_month or per_hour (one of them)")
    return Server(_name(d, where), _name(d, where, "role", "other"),
                  _money(d, "per_month", where, 0), _money(d, "per_hour", where, 0),
                  _shares(d.get("shares"), where), **_effective(d, where))


def _storage(d: Any, i: int) -> Storage:
    where = f"storage[{i}]"
    d = _keys(d, {"name", "tier", "gb", "price_per_gb_month", "shares", "from", "until"}, where)
    return Storage(_name(d, where), _name(d, where, "tier", "standard"), _decimal(d, "gb", where),
                   _money(d, "price_per_gb_month", where), _shares(d.get("shares"), where),
                   **_effective(d, where))


def _hardware(d: Any, i: int) -> Hardware:
    where = f"hardware[{i}]"
    d = _keys(d, {"name", "node_id", "price", "salvage", "purchased", "life_years", "life_hours",
                  "power_idle_w", "shares", "from", "until"}, where)
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
                    max(1, int(life_s)), node, idle, _shares(d.get("shares"), where),
                    **_effective(d, where))


def _person(d: Any, i: int) -> Person:
    where = f"people[{i}]"
    d = _keys(d, {"name", "role", "hours", "rate_per_hour", "shares", "from", "until"}, where)
    return Person(_name(d, where), _decimal(d, "hours", where), _money(d, "rate_per_hour", where),
                  _shares(d.get("shares"), where, required=True) or {},
                  str(d.get("role", "")), **_effective(d, where))


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
    energies = []
    for from_s, en in _dated_tables(doc, "energy", {"price_per_kwh", "pue"}):
        pue = _decimal(en, "pue", "[energy]", Decimal("1.0"))
        if pue < 1:
            raise InvalidRequest("[energy] pue is at least 1.0 (facility power over IT power)")
        energies.append((from_s, EnergyPrice(_money(en, "price_per_kwh", "[energy]", 150_000),
                                             pue)))
    egresses = [(from_s, Egress(_money(eg, "price_per_gb", "[egress]", 0),
                                _decimal(eg, "gb", "[egress]") if "gb" in eg else None,
                                int(_decimal(eg, "bytes_per_token", "[egress]", Decimal(200)))))
                for from_s, eg in _dated_tables(doc, "egress", {"price_per_gb", "gb",
                                                                "bytes_per_token"})]
    variables = []
    for from_s, led in _dated_tables(doc, "ledger", {"variable_categories"}):
        variable = led.get("variable_categories", ["payment_fees"])
        if not isinstance(variable, list) or not all(isinstance(x, str) for x in variable):
            raise InvalidRequest("[ledger] variable_categories must be a list of strings")
        variables.append((from_s, frozenset(variable)))
    owner_ids = plat.get("owner_ids", [])
    if not isinstance(owner_ids, list) or not all(isinstance(x, str) for x in owner_ids):
        raise InvalidRequest("[platform] owner_ids must be a list of strings")
    servers = tuple(_server(d, i) for i, d in enumerate(_list(doc, "servers")))
    storage = tuple(_storage(d, i) for i, d in enumerate(_list(doc, "storage")))
    hardware = tuple(_hardware(d, i) for i, d in enumerate(_list(doc, "hardware")))
    people = tuple(_person(d, i) for i, d in enumerate(_list(doc, "people")))
    for kind, items in (("servers", servers), ("storage", storage), ("hardware", hardware),
                        ("people", people)):
        _versions(items, kind)
    dated = any(f != ALWAYS_S for f, _ in energies + egresses + variables)
    return CostModel(
        currency=currency,
        energy=energies[-1][1], egress=egresses[-1][1],
        servers=_close_versions(servers), storage=_close_versions(storage),
        hardware=_close_versions(hardware), people=_close_versions(people),
        platform_owner_ids=frozenset(owner_ids),
        variable_ledger_categories=variables[-1][1],
        owners=_owners(doc.get("owners", {})),
        invoice_issuer=_name(plat, "[platform]", "invoice_issuer", "sparecycles"),
        provider=_name(plat, "[platform]", "provider", "sparecycles"),
        source=source,
        energy_history=tuple(energies) if dated else (),
        egress_history=tuple(egresses) if dated else (),
        variable_history=tuple(variables) if dated else (),
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
