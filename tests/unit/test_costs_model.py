"""The cost model file (the shipped example parses; mistakes are refused with a clear line) and
the owner's estimate from the performance model."""

from __future__ import annotations

import math
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

from sparecycles.costs import costmodel as cm
from sparecycles.costs.economics import estimate, owner_figures
from sparecycles.costs.usage import NodeInfo
from sparecycles.errors import InvalidRequest
from sparecycles.ledger.pricing import PayoutMode, PayoutTerms, PriceBook
from sparecycles.scheduling.presets import DEVICE_PRESETS, MODEL_PRESETS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "costs.toml"
D = 1_000_000


def test_the_shipped_example_parses():
    model = cm.load_cost_model(EXAMPLE)
    assert model.currency == "USD" and model.source == str(EXAMPLE)
    assert [s.name for s in model.servers] == ["coordinator-1", "web-1"]
    assert model.servers[1].per_hour_micros == 40_000
    assert model.storage[1].shares == {"inference": 20 * cm.share_scale,
                                       "training": 60 * cm.share_scale,
                                       "rnd": 20 * cm.share_scale}
    hw = model.hardware[0]
    assert (hw.price_micros, hw.salvage_micros, hw.node_id) == (4800 * D, 600 * D, None)
    assert hw.life_s == 3 * 365 * 86_400
    assert model.energy.pue == Decimal("1.3")
    assert model.people[1].shares == {"inference": 100 * cm.share_scale}
    assert "payment_fees" in model.variable_ledger_categories
    assert model.owners.hardware_of("laptop").life_hours == 20_000


def test_which_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(cm.ENV_VAR, raising=False)
    assert cm.cost_model_path(None) == cm.SHIPPED_EXAMPLE == EXAMPLE
    f = tmp_path / "c.toml"
    f.write_text('currency = "EUR"\n')
    monkeypatch.setenv(cm.ENV_VAR, str(f))
    assert cm.load_cost_model().currency == "EUR"
    assert cm.load_cost_model(EXAMPLE).currency == "USD"  # the flag wins
    with pytest.raises(InvalidRequest, match="cannot read"):
        cm.load_cost_model(tmp_path / "missing.toml")
    f.write_text("currency = \n")
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        cm.load_cost_model(f)


@pytest.mark.parametrize(("text", "message"), [
    ('curency = "USD"', "unknown key"),
    ('[[servers]]\nname = "a"\nper_month = "1"\nper_hour = "1"', "one of them"),
    ('[[servers]]\nname = "a"', "one of them"),
    ('[[servers]]\nname = "a"\nper_month = "1.0000001"', "6 decimal places"),
    ('[[servers]]\nname = "a"\nper_month = "-1"', "non-negative"),
    ('[[servers]]\nname = "a"\nper_month = "1"\n[[servers]]\nname = "a"\nper_month = "2"',
     "unique"),
    ('[[servers]]\nname = "a"\nper_month = "1"\nshares = { gaming = 1 }', "unknown key"),
    ('[[servers]]\nname = "a"\nper_month = "1"\nshares = { inference = 0 }', "positive"),
    ('[[people]]\nname = "p"\nhours = 1\nrate_per_hour = "1"', "shares are required"),
    ('[[hardware]]\nname = "h"\nprice = "1"\nsalvage = "2"\npurchased = 2026-01-01\n'
     "life_years = 1", "salvage value above the price"),
    ('[[hardware]]\nname = "h"\nprice = "1"\npurchased = "yesterday"\nlife_years = 1',
     "a date like"),
    ('[[hardware]]\nname = "h"\nprice = "1"\npurchased = 2026-01-01\nlife_years = 0',
     "positive"),
    ('[[hardware]]\nname = "h"\nprice = "1"\nlife_hours = 10', "purchased"),
    ('[energy]\npue = 0.9', "at least 1.0"),
    ('currency = "dollars"', "currency"),
    ('[ledger]\nvariable_categories = "fees"', "list of strings"),
])
def test_mistakes_are_refused_with_a_clear_line(text: str, message: str):
    with pytest.raises(InvalidRequest, match=message):
        cm.parse_cost_model(tomllib.loads(text))


def test_owner_figures_come_from_the_node_when_it_reports_them():
    defaults = cm.OwnerDefaults()
    node = NodeInfo("n", "o", "n", "laptop", {"electricity_price_micros_per_kwh": 300_000,
                                               "hardware_price_micros": 2000 * D,
                                               "hardware_life_h": 10_000})
    assert owner_figures(node, "laptop", defaults) == (300_000, cm.OwnerHardware(2000 * D,
                                                                                 10_000), "node")
    odd = NodeInfo("n", "o", "n", "laptop", {"electricity_price_micros_per_kwh": "cheap",
                                              "hardware_price_micros": True})
    assert owner_figures(odd, "laptop", defaults) == (
        cm.DEFAULT_OWNER_TARIFF_MICROS_PER_KWH, cm.DEFAULT_OWNER_HARDWARE["laptop"], "defaults")


def test_estimate_for_a_gaming_pc():
    gpu, spec = DEVICE_PRESETS["gaming-pc"], MODEL_PRESETS["qwen2.5-1.5b"]
    book = PriceBook.default()
    e = estimate(gpu, spec, book, tariff_micros_per_kwh=200_000,
                 hardware=cm.OwnerHardware(1500 * D, 30_000), hours_per_day=8)
    assert e.batch == 4 and e.requests_per_busy_hour > 0
    # 1.54 B parameters: the 4 B tier, 0.04 in / 0.12 out per Mtok; 1000 in + 200 out = 64 micros
    assert e.price_per_request_micros == 64
    assert e.earning_per_busy_hour_micros == math.floor(
        e.requests_per_busy_hour * 64 * 800_000 / 1_000_000)  # the owners' 80 %
    assert e.electricity_per_busy_hour_micros == 50_000  # 250 W x 0.20
    assert e.wear_per_busy_hour_micros == 50_000  # 1,500 / 30,000 h
    assert e.net_per_busy_hour_micros == (e.earning_per_busy_hour_micros - 100_000)
    assert e.busy_hours_per_month == 240
    assert e.net_per_month_micros == e.net_per_busy_hour_micros * 240


def test_estimate_busy_mode_and_a_model_that_does_not_fit():
    laptop, big = DEVICE_PRESETS["laptop"], MODEL_PRESETS["llama-3-70b"]
    book = PriceBook.default()
    e = estimate(laptop, big, book, tariff_micros_per_kwh=200_000,
                 hardware=cm.OwnerHardware(1200 * D, 20_000))
    assert e.batch == 0 and e.earning_per_busy_hour_micros == 0
    busy = PriceBook(terms=PayoutTerms(mode=PayoutMode.BUSY,
                                       busy_micros_per_hour={"laptop": 20_000}))
    small = MODEL_PRESETS["qwen2.5-0.5b"]
    e = estimate(laptop, small, busy, tariff_micros_per_kwh=200_000,
                 hardware=cm.OwnerHardware(1200 * D, 20_000))
    assert e.earning_per_busy_hour_micros == 20_000 and e.payout_mode == "busy"
