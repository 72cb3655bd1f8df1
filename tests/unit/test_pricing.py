"""Pricing is pure integer arithmetic: every micro-unit of every charge is accounted for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparecycles.errors import InvalidRequest, ModelNotFound
from sparecycles.ledger.pricing import (
    DEFAULT_TIERS,
    ModelPrice,
    PayoutMode,
    PayoutTerms,
    PriceBook,
    WorkShare,
    charge_micros,
    format_money,
    hold_micros,
    parse_money,
    price_micros,
    split_charge,
    tier_price,
)
from sparecycles.types import ModelSpec

P = ModelPrice(60_000, 180_000)  # $0.06 in, $0.18 out per million tokens


def test_price_rounds_up_to_a_whole_micro() -> None:
    assert price_micros(P, 0, 0) == 0
    assert price_micros(P, 1, 0) == 1  # 0.06 micro is charged as 1
    assert price_micros(P, 1000, 200) == 96  # 60_000_000 + 36_000_000 exactly
    assert price_micros(P, 1_000_000, 1_000_000) == 240_000


def test_hold_covers_every_charge_and_charge_never_exceeds_hold() -> None:
    hold = hold_micros(P, 500, 300)
    assert all(charge_micros(P, 500, c, hold) <= hold for c in range(0, 301, 7))
    assert charge_micros(P, 500, 300, hold) == hold
    assert charge_micros(P, 5000, 300, hold) == hold  # more prompt than held: capped


def test_split_two_nodes_by_token_value_platform_takes_remainders() -> None:
    shares = [WorkShare("o1", "n1", "gaming-pc", 1000, 100), WorkShare("o2", "n2", "laptop",
                                                                        1100, 100)]
    split = split_charge(96, P, PayoutTerms(), shares)
    # pool = floor(96 * 0.8) = 76; weights 78e6 and 84e6 of 162e6
    assert [e.amount_micros for e in split.earnings] == [36, 39]
    assert split.fee_micros == 96 - 75
    assert [(e.owner_id, e.node_id) for e in split.earnings] == [("o1", "n1"), ("o2", "n2")]


def test_split_merges_two_shares_of_one_node() -> None:
    shares = [WorkShare("o1", "n1", "pc", 10, 5), WorkShare("o1", "n1", "pc", 10, 5)]
    split = split_charge(1000, P, PayoutTerms(), shares)
    assert len(split.earnings) == 1 and split.earnings[0].amount_micros == 800


def test_split_without_shares_gives_the_platform_everything() -> None:
    split = split_charge(50, P, PayoutTerms(), [])
    assert split.earnings == () and split.fee_micros == 50


def test_busy_mode_pays_hourly_rate_capped_at_the_owner_share() -> None:
    terms = PayoutTerms(mode=PayoutMode.BUSY, owner_share_ppm=800_000,
                        busy_micros_per_hour={"gaming-pc": 100_000})
    cheap = split_charge(1_000_000, P, terms, [WorkShare("o", "n", "gaming-pc", 0, 0, 36.0)])
    assert cheap.earnings[0].amount_micros == 1000  # 36 s of $0.10/h
    capped = split_charge(100, P, terms, [WorkShare("o", "n", "gaming-pc", 0, 0, 3600.0)])
    assert capped.earnings[0].amount_micros == 80 and capped.fee_micros == 20


@given(
    charge=st.integers(0, 10**12),
    share_ppm=st.integers(0, 1_000_000),
    busy=st.booleans(),
    shares=st.lists(
        st.tuples(st.sampled_from(["o1", "o2", "o3"]), st.sampled_from(["n1", "n2", "n3", "n4"]),
                  st.integers(0, 10**6), st.integers(0, 10**6), st.floats(0, 10**5)),
        max_size=6),
)
def test_split_conserves_every_micro(charge: int, share_ppm: int, busy: bool,
                                     shares: list[tuple[str, str, int, int, float]]) -> None:
    # a node belongs to one owner: derive the owner from the node
    work = [WorkShare(f"o{n[-1]}", n, "gaming-pc", p, c, b) for _, n, p, c, b in shares]
    terms = PayoutTerms(mode=PayoutMode.BUSY if busy else PayoutMode.TOKENS,
                        owner_share_ppm=share_ppm, busy_micros_per_hour={"gaming-pc": 10**9})
    split = split_charge(charge, P, terms, work)
    total = sum(e.amount_micros for e in split.earnings)
    assert total + split.fee_micros == charge
    assert all(e.amount_micros >= 0 for e in split.earnings)
    assert total <= charge * share_ppm // 1_000_000


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_price_is_monotone_in_completion(prompt: int, c1: int, c2: int) -> None:
    lo, hi = sorted((c1, c2))
    assert price_micros(P, prompt, lo) <= price_micros(P, prompt, hi)


def test_money_text_round_trips_exactly() -> None:
    assert parse_money("10.00") == 10_000_000
    assert parse_money("0.000001") == 1
    assert format_money(10_000_000) == "10.00"
    assert format_money(1_230_000, "USD") == "1.23 USD"
    assert format_money(-1) == "-0.000001"
    for bad in ("-1", "1.0000001", "abc", "nan", "1e30"):
        with pytest.raises(InvalidRequest):
            parse_money(bad)


@given(st.integers(0, 10**15))
def test_format_then_parse_is_identity(micros: int) -> None:
    assert parse_money(format_money(micros)) == micros


def test_price_book_defaults_overrides_and_config() -> None:
    book = PriceBook.default()
    assert book.price_of("anything") == DEFAULT_TIERS[2][1]
    assert book.terms.owner_share_ppm == 800_000 and book.terms.fee_ppm == 200_000
    assert book.with_price("tiny", ModelPrice(1, 2)).price_of("tiny") == ModelPrice(1, 2)
    spec = ModelSpec("big", 70_000_000_000, 2, 80, 8192, 8, 128, 8192)
    assert book.with_specs([spec]).price_of("big") == tier_price(70_000_000_000)
    with pytest.raises(ModelNotFound):
        PriceBook(fallback=None).price_of("x")
    cfg = PriceBook.from_dict({"owner_share_percent": "75", "payout_min": "2.50",
                               "models": {"tiny": {"input": "0.02", "output": "0.06"}},
                               "busy_per_hour": {"laptop": "0.05"}})
    assert cfg.terms.owner_share_ppm == 750_000 and cfg.payout_min_micros == 2_500_000
    assert cfg.price_of("tiny") == ModelPrice(20_000, 60_000)
    assert cfg.terms.busy_rate("laptop") == 50_000
    assert PayoutTerms.from_dict(cfg.terms.as_dict()) == cfg.terms
    doc = cfg.as_dict()
    assert doc["models"]["tiny"] == {"input_micros_per_mtok": 20_000,
                                     "output_micros_per_mtok": 60_000}
    assert doc["fee_ppm"] == 250_000


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        price_micros(P, -1, 0)
    with pytest.raises(InvalidRequest):
        ModelPrice(-5, 0)
    with pytest.raises(InvalidRequest):
        PayoutTerms(owner_share_ppm=1_000_001)
    with pytest.raises(InvalidRequest):
        split_charge(10, P, PayoutTerms(), [WorkShare("o", "n", "x", 1, 1, -1.0)])
