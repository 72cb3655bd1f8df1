"""The fleet file: device classes with profiles, counts, models and availability (TOML).

The format is documented in docs/scheduling.md, with examples in examples/fleets/. In short::

    [fleet]
    name = "mixed"

    [slo]                       # optional; what a request must meet to count as goodput
    ttft_s = 5.0                # first token within ttft_s + ttft_s_per_ktok per 1,000 prompt
    ttft_s_per_ktok = 1.0       # tokens (fleet_file.SLO says why it scales)
    tpot_s = 0.2

    [[class]]
    name = "gaming-pc"
    device = "gaming-pc"        # a preset of presets.DEVICE_PRESETS
    count = 120
    models = ["llama-3-8b-q4"]  # presets; nodes are split evenly between them
    jobs_max = 8
    utc_offsets_minutes = [60, 0]
    speed_mean = 1.0            # real engine speed over the roofline's prediction
    speed_sigma = 0.25          # node-to-node spread (log-normal sigma), unknown to the scheduler
    price_per_mtok = "0.10"     # the owner's asking price, USD per million tokens
    layers = [[0, 20], [20, 40]]  # optional: each node holds one range of the (one) model's
                                # layers, taken in turn (chains, sim/chains.py); else the whole
    uplink_mbit_s = 20          # optional: the nodes' network link (KV-cache hand-offs), else
    downlink_mbit_s = 200       # the preset's (presets.py says what each assumes)
    [class.profile]             # optional overrides of the preset's fields
    network_rtt_s = 0.05
    [class.availability]
    kind = "weibull"            # "always" | "weibull" | "parked-car"
    up = "Nd07cpu"              # an FTA fit, or up_shape / up_scale_h
    down = "Nd07cpu"
    windows = [["23:00", "19:00"]]
    drain_grace_s = 30
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sparecycles import availability as av
from sparecycles.errors import InvalidRequest
from sparecycles.ledger.pricing import parse_money
from sparecycles.scheduling.chains import stage_spec
from sparecycles.scheduling.perfmodel import usable_memory_bytes
from sparecycles.scheduling.presets import MBIT, device_preset, model_preset
from sparecycles.sim.churn import AvailabilitySpec, CarHabits
from sparecycles.types import DeviceProfile

FTA_FITS: dict[str, tuple[av.StayModel, av.StayModel]] = {
    "microsoft99": (av.FTA_MICROSOFT99_UP, av.FTA_MICROSOFT99_DOWN),
    "nd07cpu": (av.FTA_ND07CPU_UP, av.FTA_ND07CPU_DOWN),
    "skype06": (av.FTA_SKYPE06_UP, av.FTA_SKYPE06_DOWN),
}
fleet_nodes_max = 10_000_000  # a sanity bound on one fleet file
chain_ranges_max = 64  # layer ranges listed by one class
link_mbit_s_max = 10_000_000.0  # 10 Tbit/s: a sanity bound on a class's link


@dataclass(frozen=True, slots=True)
class ClassSpec:
    name: str
    profile: DeviceProfile
    count: int
    models: tuple[str, ...]
    jobs_max: int = 8
    utc_offsets_minutes: tuple[int, ...] = (0,)
    speed_mean: float = 1.0
    speed_sigma: float = 0.0
    price_micros_per_mtok: int = 0
    reputation: float = 1.0
    availability: AvailabilitySpec = field(default_factory=AvailabilitySpec)
    # chains: the layer ranges [first, end) of ``models[0]`` its nodes hold, node i the
    # (i mod len)-th; empty: each node holds its model whole
    layers: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class SLO:
    """What a request must meet to count as goodput. The time to first token allowed grows with
    the prompt: ``ttft_s + ttft_s_per_ktok * prompt_tokens / 1000``. Published SLO studies
    scale the target with the work of the request: Splitwise (Patel et al., ISCA 2024, the
    source of the Azure traces) sets each request's SLO as a slowdown over its own latency on
    an unloaded machine, so a 100k-token prompt is allowed what its prefill needs. Ours is the
    linear form of that, with the fleet's common consumer GPU as the reference: 1 s per 1,000
    prompt tokens is about what an RTX 3060 (the gaming-pc preset) needs to prefill an 8B model
    alone (1.3 s per 1,000 at 1k tokens, 1.5 at 12k), five times an RTX 4090's, on top of the
    fixed 5 s: a long prompt meets it only where prefill is fast."""

    ttft_s: float = 5.0  # first token within 5 s (plus the prompt's share): a chat user waiting
    tpot_s: float = 0.2  # then 5 tokens/s or better: faster than people read
    ttft_s_per_ktok: float = 1.0  # ... plus this per 1,000 prompt tokens (0: a fixed target)

    def ttft_target_s(self, prompt_tokens: Any) -> Any:  # a float, or numpy arrays of them
        return self.ttft_s + self.ttft_s_per_ktok * prompt_tokens / 1000.0


@dataclass(frozen=True, slots=True)
class FleetSpec:
    name: str
    classes: tuple[ClassSpec, ...]
    slo: SLO = SLO()

    @property
    def node_count(self) -> int:
        return sum(c.count for c in self.classes)

    @property
    def chained(self) -> bool:
        """Whether its nodes hold layer ranges (a fleet for chains, sim/chains.py)."""
        return any(c.layers for c in self.classes)

    def scaled(self, nodes: int) -> FleetSpec:
        """The same mix with about ``nodes`` nodes in all (each class at least one)."""
        total = self.node_count
        classes = tuple(
            replace(c, count=max(1, round(c.count * nodes / total))) for c in self.classes
        )
        return replace(self, classes=classes)


def _minutes(value: Any) -> int:
    """Minutes of the day from 570 or "09:30"."""
    if isinstance(value, int):
        return value
    hours, _, minutes = str(value).partition(":")
    return int(hours) * 60 + int(minutes or 0)


def _stay(table: dict[str, Any], which: str) -> av.StayModel | None:
    if f"{which}_shape" in table:
        return av.StayModel.from_hours(
            float(table[f"{which}_shape"]), float(table[f"{which}_scale_h"])
        )
    name = table.get(which)
    if name is None:
        return None
    fits = FTA_FITS.get(str(name).lower())
    if fits is None:
        raise InvalidRequest(f"unknown availability fit {name!r}; known: {', '.join(FTA_FITS)}")
    return fits[0] if which == "up" else fits[1]


def _car(table: dict[str, Any] | None) -> CarHabits:
    if not table:
        return CarHabits()
    base = CarHabits()
    return CarHabits(
        home_departure_min=_minutes(table.get("home_departure", int(base.home_departure_min))),
        work_departure_min=_minutes(table.get("work_departure", int(base.work_departure_min))),
        commute_min=float(table.get("commute_min", base.commute_min)),
        schedule_spread_min=float(table.get("schedule_spread_min", base.schedule_spread_min)),
        departure_jitter_min=float(table.get("departure_jitter_min", base.departure_jitter_min)),
        plugged_at_home=float(table.get("plugged_at_home", base.plugged_at_home)),
        plugged_at_work=float(table.get("plugged_at_work", base.plugged_at_work)),
    )


def parse_availability(table: dict[str, Any]) -> AvailabilitySpec:
    kind = str(table.get("kind", "always"))
    return AvailabilitySpec(
        kind=kind,
        up=_stay(table, "up"),
        down=_stay(table, "down"),
        windows=tuple((_minutes(a), _minutes(b)) for a, b in table.get("windows", ())),
        only_on_ac_power=bool(table.get("only_on_ac_power", False)),
        only_while_charging=bool(table.get("only_while_charging", False)),
        drain_grace_s=float(table.get("drain_grace_s", 30.0)),
        car=_car(table.get("car")) if kind == "parked-car" else None,
        diurnal_amplitude=float(table.get("diurnal_amplitude", 0.0)),
        correlated_events_per_day=float(table.get("correlated_events_per_day", 0.0)),
        correlated_leave_fraction=float(table.get("correlated_leave_fraction", 0.0)),
    )


def _profile(table: dict[str, Any]) -> DeviceProfile:
    base = device_preset(str(table["device"]))
    overrides = table.get("profile", {})
    known = {f.name for f in fields(DeviceProfile)}
    unknown = set(overrides) - known
    if unknown:
        raise InvalidRequest(f"unknown profile fields {sorted(unknown)}")
    profile = replace(base, **overrides)
    if "uplink_mbit_s" in table:
        profile = replace(profile, uplink_bytes_per_s=_mbit(table, "uplink_mbit_s") * MBIT)
    if "downlink_mbit_s" in table:
        profile = replace(profile, downlink_bytes_per_s=_mbit(table, "downlink_mbit_s") * MBIT)
    return profile


def _mbit(table: dict[str, Any], key: str) -> float:
    mbit = float(table[key])
    if not 0.0 <= mbit <= link_mbit_s_max:
        raise InvalidRequest(f"{key} out of range: {mbit}")
    return mbit


def _layers(table: dict[str, Any], models: tuple[str, ...], profile: DeviceProfile
            ) -> tuple[tuple[int, int], ...]:
    """A class's layer ranges, checked: one model, ranges inside it, each fitting the device."""
    raw = table.get("layers", ())
    if not raw:
        return ()
    if len(models) != 1:
        raise InvalidRequest(f"class {table.get('name')!r}: layers need exactly one model")
    spec = model_preset(models[0])
    ranges: list[tuple[int, int]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(v, int) for v in item)):
            raise InvalidRequest(f"layers entries are [first, end] pairs, not {item!r}")
        first, end = int(item[0]), int(item[1])
        if not 0 <= first < end <= spec.n_layers:
            raise InvalidRequest(
                f"layers [{first}, {end}] outside {spec.name}'s 0..{spec.n_layers}")
        part = stage_spec(spec, first, end)
        if part.weight_bytes >= usable_memory_bytes(profile):
            raise InvalidRequest(
                f"class {table.get('name')!r}: layers [{first}, {end}] of {spec.name} "
                f"({part.weight_bytes / 1e9:.1f} GB) do not fit the device's memory")
        ranges.append((first, end))
    if len(ranges) > chain_ranges_max:
        raise InvalidRequest(f"a class lists at most {chain_ranges_max} layer ranges")
    return tuple(ranges)


def parse_class(table: dict[str, Any]) -> ClassSpec:
    models = tuple(str(m) for m in table.get("models", ()))
    if not models:
        raise InvalidRequest(f"class {table.get('name')!r} lists no models")
    for m in models:
        model_preset(m)  # raises NotFound for a model the simulator cannot describe
    count = int(table.get("count", 1))
    if not 0 <= count <= fleet_nodes_max:
        raise InvalidRequest(f"class count out of range: {count}")
    price = table.get("price_per_mtok")
    profile = _profile(table)
    return ClassSpec(
        name=str(table.get("name", table["device"])),
        profile=profile,
        count=count,
        models=models,
        jobs_max=int(table.get("jobs_max", 8)),
        utc_offsets_minutes=tuple(int(v) for v in table.get("utc_offsets_minutes", (0,))) or (0,),
        speed_mean=float(table.get("speed_mean", 1.0)),
        speed_sigma=float(table.get("speed_sigma", 0.0)),
        price_micros_per_mtok=parse_money(str(price)) if price is not None else 0,
        reputation=float(table.get("reputation", 1.0)),
        availability=parse_availability(table.get("availability", {})),
        layers=_layers(table, models, profile),
    )


def parse_fleet(data: dict[str, Any]) -> FleetSpec:
    classes = tuple(parse_class(t) for t in data.get("class", ()))
    if not classes:
        raise InvalidRequest("a fleet needs at least one [[class]]")
    if sum(c.count for c in classes) > fleet_nodes_max:
        raise InvalidRequest(f"a fleet has at most {fleet_nodes_max} nodes")
    slo_table, default = data.get("slo", {}), SLO()
    slo = SLO(
        ttft_s=float(slo_table.get("ttft_s", default.ttft_s)),
        tpot_s=float(slo_table.get("tpot_s", default.tpot_s)),
        ttft_s_per_ktok=float(slo_table.get("ttft_s_per_ktok", default.ttft_s_per_ktok)),
    )
    chained = {m for c in classes if c.layers for m in c.models}
    if len(chained) > 1 or (chained and any(not c.layers for c in classes)):
        raise InvalidRequest("a fleet for chains holds layer ranges of one model in every class "
                             "(whole-model nodes beside chains are not simulated yet)")
    name = str(data.get("fleet", {}).get("name", "fleet"))
    return FleetSpec(name=name, classes=classes, slo=slo)


def load_fleet(path: str | Path) -> FleetSpec:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{path}: {exc}") from None
    return parse_fleet(data)


def lognormal_factor(rng_value: float, mean: float, sigma: float) -> float:
    """A node's true speed over the prediction: ``mean`` times exp(N(0, sigma)) given a standard
    normal draw, so that the class's median node runs at ``mean``."""
    return mean * math.exp(sigma * rng_value)
