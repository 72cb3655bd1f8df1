"""Owner economics: what sharing a device earns its owner, and what it costs them. Pure.

For each node in a period: what it **earned** (ledger earnings, net of withholds), what its
**electricity** cost the owner (its metered joules at the owner's tariff) and its **wear** (the
depreciation of the owner's hardware per busy hour: price / life in busy hours), hence the **net
profit per hour of sharing**. The tariff and the hardware figures come from the node's profile
(``electricity_price_micros_per_kwh``, ``hardware_price_micros``, ``hardware_life_h``) when the
agent reports them, else from the cost model's ``[owners]`` defaults per device class.

``estimate`` answers a would-be owner before joining: from the performance model (how many
requests the device would serve per busy hour), the current prices and payout terms, the device's
power draw and the same wear rule, what a busy hour and a month would likely earn and cost.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sparecycles.costs.allocation import J_PER_KWH, to_micros
from sparecycles.costs.costmodel import CostModel, OwnerDefaults, OwnerHardware
from sparecycles.costs.usage import NodeInfo, PeriodUsage
from sparecycles.ledger.pricing import PPM, PayoutMode, PriceBook, price_micros
from sparecycles.scheduling import perfmodel as pm
from sparecycles.types import DeviceProfile, ModelSpec

days_per_month = 30  # for "per month" figures of the estimate
estimate_hours_per_day_max = 24.0


@dataclass(frozen=True, slots=True)
class NodeEconomics:
    node_id: str
    name: str
    owner_id: str
    device_class: str
    jobs: int
    busy_s: float
    energy_j: float
    energy_sources: tuple[str, ...]
    earned_micros: int
    electricity_micros: int
    wear_micros: int
    tariff_micros_per_kwh: int
    figures_from: str  # "node" (reported by the agent) or "defaults" (of its device class)

    @property
    def net_micros(self) -> int:
        return self.earned_micros - self.electricity_micros - self.wear_micros

    @property
    def net_per_busy_hour_micros(self) -> int | None:
        if self.busy_s <= 0:
            return None
        return round(self.net_micros * 3600 / self.busy_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "name": self.name, "owner_id": self.owner_id,
            "device_class": self.device_class, "jobs": self.jobs,
            "busy_s": round(self.busy_s, 6), "energy_j": round(self.energy_j, 3),
            "energy_sources": list(self.energy_sources),
            "earned_micros": self.earned_micros, "electricity_micros": self.electricity_micros,
            "wear_micros": self.wear_micros, "net_micros": self.net_micros,
            "net_per_busy_hour_micros": self.net_per_busy_hour_micros,
            "tariff_micros_per_kwh": self.tariff_micros_per_kwh,
            "figures_from": self.figures_from,
        }


def owner_figures(node: NodeInfo | None, device_class: str, defaults: OwnerDefaults
                  ) -> tuple[int, OwnerHardware, str]:
    """(tariff micros/kWh, hardware, "node" | "defaults") for one node, read defensively."""
    profile: Mapping[str, Any] = node.profile if node else {}
    hw = defaults.hardware_of(device_class)
    tariff, price, life = (profile.get("electricity_price_micros_per_kwh"),
                           profile.get("hardware_price_micros"), profile.get("hardware_life_h"))
    source = "defaults"
    if isinstance(tariff, int) and not isinstance(tariff, bool) and tariff >= 0:
        source = "node"
    else:
        tariff = defaults.electricity_price_per_kwh_micros
    if (isinstance(price, int) and isinstance(life, int | float) and price >= 0 and life > 0
            and not isinstance(price, bool)):
        hw, source = OwnerHardware(price, max(1, int(life))), "node"
    return tariff, hw, source


def owner_economics(usage: PeriodUsage, model: CostModel) -> list[NodeEconomics]:
    """Every node that worked in the period, most earned first."""
    earned: dict[str, int] = defaultdict(int)
    busy: dict[str, float] = defaultdict(float)
    energy: dict[str, float] = defaultdict(float)
    sources: dict[str, set[str]] = defaultdict(set)
    jobs: dict[str, set[str]] = defaultdict(set)
    owners: dict[str, str] = {}
    for job in usage.jobs:
        for e in job.earnings:
            earned[e.node_id] += e.amount_micros
            owners.setdefault(e.node_id, e.owner_id)
        for a in job.attempts:
            busy[a.node_id] += a.busy_s
            energy[a.node_id] += a.energy_j
            sources[a.node_id].add(a.energy_source)
            jobs[a.node_id].add(job.job_id)
    out = []
    for node_id in sorted(set(earned) | set(busy)):
        info = usage.nodes.get(node_id)
        cls = info.device_class if info else "unknown"
        tariff, hw, source = owner_figures(info, cls, model.owners)
        electricity = to_micros(Decimal(repr(energy[node_id])) * tariff / J_PER_KWH)
        wear = to_micros(Decimal(repr(busy[node_id])) / 3600 * hw.price_micros / hw.life_hours)
        out.append(NodeEconomics(
            node_id, info.name if info else node_id,
            info.owner_id if info else owners.get(node_id, ""), cls, len(jobs[node_id]),
            busy[node_id], energy[node_id], tuple(sorted(sources[node_id])), earned[node_id],
            electricity, wear, tariff, source))
    return sorted(out, key=lambda n: (-n.earned_micros, n.node_id))


# ---- the estimate for a would-be owner ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnerEstimate:
    device_class: str
    model: str
    batch: int  # the batch the device can hold at this request size (0: it cannot serve it)
    prompt_tokens: int
    output_tokens: int
    requests_per_busy_hour: float
    output_tokens_per_busy_hour: float
    price_per_request_micros: int
    earning_per_busy_hour_micros: int
    power_busy_w: float
    tariff_micros_per_kwh: int
    electricity_per_busy_hour_micros: int
    wear_per_busy_hour_micros: int
    busy_hours_per_month: float
    payout_mode: str

    @property
    def net_per_busy_hour_micros(self) -> int:
        return (self.earning_per_busy_hour_micros - self.electricity_per_busy_hour_micros
                - self.wear_per_busy_hour_micros)

    @property
    def net_per_month_micros(self) -> int:
        return round(self.net_per_busy_hour_micros * self.busy_hours_per_month)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]
        d["net_per_busy_hour_micros"] = self.net_per_busy_hour_micros
        d["net_per_month_micros"] = self.net_per_month_micros
        return d


def estimate(profile: DeviceProfile, spec: ModelSpec, book: PriceBook, *,
             tariff_micros_per_kwh: int, hardware: OwnerHardware, hours_per_day: float = 8.0,
             batch: int = 4, prompt_tokens: int = 1000, output_tokens: int = 200,
             calib: pm.Calibration = pm.DEFAULT_CALIBRATION) -> OwnerEstimate:
    """What a busy hour of ``profile`` serving ``spec`` would earn and cost its owner.

    The device serves ``batch`` requests of ``prompt_tokens`` + ``output_tokens`` at a time (the
    largest batch that fits, if ``batch`` does not); a batch takes the performance model's
    end-to-end time, so a busy hour serves ``batch * 3600 / request_s`` requests. Earnings
    follow the payout terms (tokens: the owners' share of each charge; busy: the hourly rate of
    the device class). Electricity is the busy draw at the owner's tariff, wear the hardware's
    price over its life in busy hours."""
    hours_per_day = min(max(0.0, hours_per_day), estimate_hours_per_day_max)
    context = prompt_tokens + output_tokens
    fit = min(max(1, batch), pm.max_batch(spec, profile, context, calib))
    price = book.with_specs([spec]).price_of(spec.name)
    per_request = price_micros(price, prompt_tokens, output_tokens)
    requests_h = 0.0
    if fit > 0:
        _, total_s = pm.request_s(spec, profile, prompt_tokens, output_tokens, fit, calib)
        requests_h = fit * 3600.0 / total_s if total_s > 0 else 0.0
    terms = book.terms
    if terms.mode is PayoutMode.BUSY:
        earning_h = terms.busy_rate(profile.device_class) if fit > 0 else 0
    else:
        earning_h = math.floor(requests_h * per_request * terms.owner_share_ppm / PPM)
    electricity_h = round(profile.power_busy_w / 1000 * tariff_micros_per_kwh)
    wear_h = round(hardware.price_micros / hardware.life_hours)
    return OwnerEstimate(
        profile.device_class, spec.name, fit, prompt_tokens, output_tokens, requests_h,
        requests_h * output_tokens, per_request, earning_h, profile.power_busy_w,
        tariff_micros_per_kwh, electricity_h, wear_h, hours_per_day * days_per_month,
        str(terms.mode))
