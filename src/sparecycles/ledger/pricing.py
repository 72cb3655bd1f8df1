"""Prices and the split of every charge: pure integer arithmetic, no database, no clock.

Money is an ``int`` of micro-units of the PriceBook's currency (1 USD = 1_000_000 micros). Prices
are micro-units per million tokens, so $0.06 per million tokens is ``60_000``.

Rounding rules. Each is exact integer arithmetic and conserves every micro-unit:

1. ``price = ceil((prompt * input_rate + completion * output_rate) / 1_000_000)``: the client
   pays the exact price rounded *up* to a whole micro-unit, so no job with tokens is free; the
   client pays at most one micro-unit above the exact price, and it lands with the platform.
2. ``hold = price(prompt, max_tokens)``. The price is monotone in the completion, so the hold
   covers every charge the job can end with.
3. ``charge = min(price(prompt, completion), hold)``: a client never pays more than its hold.
4. The owners' pool is ``floor(charge * owner_share_ppm / 1_000_000)``. With the ``tokens`` payout
   mode the pool is split between the nodes by the value of the tokens each processed, each share
   rounded *down*; with the ``busy`` mode each node earns its busy seconds at its device class's
   hourly rate, rounded down, and the pool is the most the owners can earn (scaled down
   proportionally, rounded down, when their busy pay would exceed it).
5. ``fee = charge - sum(earnings)``: the platform receives every remainder of rules 4, so
   ``charge == sum(earnings) + fee`` always (checked by ``invariant``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from sparecycles.errors import InvalidRequest, ModelNotFound, invariant
from sparecycles.types import MICROS_PER_UNIT, ModelSpec

TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
PPM = 1_000_000  # shares are parts per million
US_PER_HOUR = 3_600_000_000  # busy time is metered in microseconds, busy rates are per hour
amount_micros_max = 10**15  # one transfer or price: a billion units; BIGINT holds 9.2e18
tokens_max = 100_000_000  # tokens in one job, far above any context; bounds the arithmetic
currency_pattern = re.compile(r"^[A-Z]{3,8}$")


class PayoutMode(enum.StrEnum):
    """How an owner's earning is measured. ``tokens`` is the default: tokens are counted by the
    coordinator and checked by verification, while busy seconds are reported by the node and a
    slow node would earn more for the same work."""

    TOKENS = "tokens"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """What a client pays for a model, in micro-units per million tokens."""

    input_micros_per_mtok: int
    output_micros_per_mtok: int

    def __post_init__(self) -> None:
        for v in (self.input_micros_per_mtok, self.output_micros_per_mtok):
            if not isinstance(v, int) or not 0 <= v <= amount_micros_max:
                raise InvalidRequest(f"a price must be an integer of micro-units, got {v!r}")


@dataclass(frozen=True, slots=True)
class PayoutTerms:
    """The owners' part of every charge; the platform fee is the rest (``fee_ppm``)."""

    mode: PayoutMode = PayoutMode.TOKENS
    owner_share_ppm: int = 800_000  # 80 % to owners, 20 % platform fee: see docs/ledger.md
    busy_micros_per_hour: Mapping[str, int] = field(default_factory=dict)
    busy_default_micros_per_hour: int = 30_000

    def __post_init__(self) -> None:
        if not 0 <= self.owner_share_ppm <= PPM:
            raise InvalidRequest(f"owner share must be 0..{PPM} ppm, got {self.owner_share_ppm}")

    @property
    def fee_ppm(self) -> int:
        return PPM - self.owner_share_ppm

    def busy_rate(self, device_class: str) -> int:
        return self.busy_micros_per_hour.get(device_class, self.busy_default_micros_per_hour)

    def as_dict(self) -> dict[str, Any]:
        """The terms as stored with each hold (JSON), so settlement uses admission's terms."""
        return {
            "mode": str(self.mode),
            "owner_share_ppm": self.owner_share_ppm,
            "busy_micros_per_hour": dict(self.busy_micros_per_hour),
            "busy_default_micros_per_hour": self.busy_default_micros_per_hour,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PayoutTerms:
        return cls(
            mode=PayoutMode(d["mode"]),
            owner_share_ppm=int(d["owner_share_ppm"]),
            busy_micros_per_hour={k: int(v) for k, v in d["busy_micros_per_hour"].items()},
            busy_default_micros_per_hour=int(d["busy_default_micros_per_hour"]),
        )


@dataclass(frozen=True, slots=True)
class WorkShare:
    """One node's part of a job: what it processed, for the owner's earning.

    ``prompt_tokens`` counts what that node prefilled (a resumed attempt prefills the prompt plus
    the tokens already delivered); ``completion_tokens`` what it generated and delivered.
    ``work_ppm`` is the part of each token's work the node did, in parts per million: the whole
    (``PPM``) for a node that held the whole model; for a stage of a chain, the bytes its layers
    read per token over the bytes the whole model reads (docs/ledger.md, "Chains").
    """

    owner_id: str
    node_id: str
    device_class: str
    prompt_tokens: int
    completion_tokens: int
    busy_s: float = 0.0
    work_ppm: int = PPM


@dataclass(frozen=True, slots=True)
class Earning:
    owner_id: str
    node_id: str
    amount_micros: int


@dataclass(frozen=True, slots=True)
class Split:
    """A charge divided: ``charge_micros == sum(e.amount_micros for e in earnings) + fee``."""

    charge_micros: int
    earnings: tuple[Earning, ...]
    fee_micros: int


# Defaults by model size, USD per million tokens (input, output). Below hosted prices of
# open-weight models of the same size, output three times input; see docs/ledger.md.
DEFAULT_TIERS: tuple[tuple[int, ModelPrice], ...] = (
    (1_500_000_000, ModelPrice(20_000, 60_000)),
    (4_000_000_000, ModelPrice(40_000, 120_000)),
    (9_000_000_000, ModelPrice(60_000, 180_000)),
    (16_000_000_000, ModelPrice(100_000, 300_000)),
    (40_000_000_000, ModelPrice(200_000, 600_000)),
    (10**15, ModelPrice(400_000, 1_200_000)),
)
# About twice the energy cost of the device's extra draw under load at $0.20/kWh.
DEFAULT_BUSY_MICROS_PER_HOUR: dict[str, int] = {
    "laptop": 20_000,
    "car": 40_000,
    "gaming-pc": 100_000,
    "server": 150_000,
    "datacenter-gpu": 800_000,
}
DEFAULT_PAYOUT_MIN_MICROS = 5 * MICROS_PER_UNIT


def tier_price(n_params: int) -> ModelPrice:
    """The default price of a model with ``n_params`` parameters."""
    for bound, price in DEFAULT_TIERS:
        if n_params <= bound:
            return price
    return DEFAULT_TIERS[-1][1]


@dataclass(frozen=True, slots=True)
class PriceBook:
    """Every price and payout term of one currency. ``fallback`` prices models not listed; with
    ``fallback=None`` an unlisted model is refused (ModelNotFound)."""

    currency: str = "USD"
    models: Mapping[str, ModelPrice] = field(default_factory=dict)
    fallback: ModelPrice | None = DEFAULT_TIERS[2][1]
    terms: PayoutTerms = field(default_factory=PayoutTerms)
    payout_min_micros: int = DEFAULT_PAYOUT_MIN_MICROS

    def __post_init__(self) -> None:
        if not currency_pattern.match(self.currency):
            raise InvalidRequest(f"currency must be an ISO-like code, got {self.currency!r}")

    @classmethod
    def default(cls, currency: str = "USD") -> PriceBook:
        """The shipped defaults (see docs/ledger.md for how they were chosen)."""
        return cls(
            currency=currency,
            terms=PayoutTerms(busy_micros_per_hour=dict(DEFAULT_BUSY_MICROS_PER_HOUR)),
        )

    def price_of(self, model: str) -> ModelPrice:
        price = self.models.get(model, self.fallback)
        if price is None:
            raise ModelNotFound(f"no price for model '{model}'", param="model")
        return price

    def with_price(self, model: str, price: ModelPrice) -> PriceBook:
        return replace(self, models={**self.models, model: price})

    def with_specs(self, specs: Iterable[ModelSpec]) -> PriceBook:
        """Price every model not priced yet by its size (``DEFAULT_TIERS``)."""
        add = {s.name: tier_price(s.n_params) for s in specs if s.name not in self.models}
        return replace(self, models={**add, **self.models})

    def as_dict(self) -> dict[str, Any]:
        """JSON for the admin API: every amount in integer micro-units."""

        def price(p: ModelPrice | None) -> dict[str, int] | None:
            return None if p is None else {"input_micros_per_mtok": p.input_micros_per_mtok,
                                           "output_micros_per_mtok": p.output_micros_per_mtok}

        return {"currency": self.currency,
                "models": {k: price(v) for k, v in sorted(self.models.items())},
                "fallback": price(self.fallback), "terms": self.terms.as_dict(),
                "fee_ppm": self.terms.fee_ppm, "payout_min_micros": self.payout_min_micros}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PriceBook:
        """From configuration (TOML ``[prices]``), amounts as decimal strings of the currency::

            currency = "USD"
            owner_share_percent = "80"
            payout_mode = "tokens"
            payout_min = "5.00"
            default = { input = "0.06", output = "0.18" }
            models.tiny = { input = "0.02", output = "0.06" }
            busy_per_hour = { gaming-pc = "0.10" }
        """
        base = cls.default(str(d.get("currency", "USD")))

        def price(p: Mapping[str, Any]) -> ModelPrice:
            return ModelPrice(parse_money(str(p["input"])), parse_money(str(p["output"])))

        share = d.get("owner_share_percent")
        terms = PayoutTerms(
            mode=PayoutMode(d.get("payout_mode", base.terms.mode)),
            owner_share_ppm=(
                base.terms.owner_share_ppm
                if share is None
                else int(Decimal(str(share)) * 10_000)
            ),
            busy_micros_per_hour={
                **base.terms.busy_micros_per_hour,
                **{k: parse_money(str(v)) for k, v in d.get("busy_per_hour", {}).items()},
            },
        )
        return replace(
            base,
            models={k: price(v) for k, v in d.get("models", {}).items()},
            fallback=price(d["default"]) if "default" in d else base.fallback,
            terms=terms,
            payout_min_micros=parse_money(str(d.get("payout_min", "5.00"))),
        )


def _check_tokens(*counts: int) -> None:
    for n in counts:
        if not isinstance(n, int) or not 0 <= n <= tokens_max:
            raise InvalidRequest(f"token counts must be integers in 0..{tokens_max}, got {n!r}")


def price_micros(price: ModelPrice, prompt_tokens: int, completion_tokens: int) -> int:
    """Rule 1: the exact price rounded up to a whole micro-unit."""
    _check_tokens(prompt_tokens, completion_tokens)
    exact = prompt_tokens * price.input_micros_per_mtok
    exact += completion_tokens * price.output_micros_per_mtok
    return -(-exact // TOKENS_PER_PRICE_UNIT)


def hold_micros(price: ModelPrice, prompt_tokens: int, max_tokens: int) -> int:
    """Rule 2: the most a job can cost, reserved when it is admitted."""
    return price_micros(price, prompt_tokens, max_tokens)


def charge_micros(
    price: ModelPrice, prompt_tokens: int, completion_tokens: int, hold: int
) -> int:
    """Rule 3: what the job costs, never above its hold."""
    return min(price_micros(price, prompt_tokens, completion_tokens), hold)


def _merge(shares: Iterable[WorkShare]) -> list[WorkShare]:
    """One share per (node, owner), in a stable order, so ids and roundings are deterministic."""
    merged: dict[tuple[str, str], WorkShare] = {}
    for s in shares:
        _check_tokens(s.prompt_tokens, s.completion_tokens)
        if not (isinstance(s.work_ppm, int) and 0 <= s.work_ppm <= PPM):
            raise InvalidRequest(f"work_ppm must be an integer in 0..{PPM}, got {s.work_ppm!r}")
        if not s.busy_s >= 0.0:
            raise InvalidRequest(f"busy_s must be >= 0, got {s.busy_s!r}")
        key = (s.node_id, s.owner_id)
        if key in merged:
            m = merged[key]
            s = replace(
                m,
                prompt_tokens=m.prompt_tokens + s.prompt_tokens,
                completion_tokens=m.completion_tokens + s.completion_tokens,
                busy_s=m.busy_s + s.busy_s,
            )
        merged[key] = s
    return [merged[k] for k in sorted(merged)]


def split_charge(
    charge: int, price: ModelPrice, terms: PayoutTerms, shares: Iterable[WorkShare]
) -> Split:
    """Rules 4 and 5: each owner's earning for their share of the work, the rest is the fee."""
    invariant(0 <= charge <= amount_micros_max, "charge out of range")
    shares = list(shares)
    work = _merge(shares)
    pool = charge * terms.owner_share_ppm // PPM
    if terms.mode is PayoutMode.TOKENS:
        # each share's token value times the part of each token's work it did, summed per node
        # before the merge (a node's shares may differ in part); all-whole shares scale every
        # weight by PPM alike, which leaves every floor below unchanged
        value: dict[tuple[str, str], int] = {}
        for s in shares:
            key = (s.node_id, s.owner_id)
            value[key] = value.get(key, 0) + s.work_ppm * (
                s.prompt_tokens * price.input_micros_per_mtok
                + s.completion_tokens * price.output_micros_per_mtok)
        weights = [value[(s.node_id, s.owner_id)] for s in work]
        if work and sum(weights) == 0:
            weights = [1] * len(work)  # no token value to go by: equal parts
        total = sum(weights)
        amounts = [pool * w // total for w in weights] if total else []
    else:
        amounts = [
            round(s.busy_s * 1_000_000) * terms.busy_rate(s.device_class) // US_PER_HOUR
            for s in work
        ]
        busy_total = sum(amounts)
        if busy_total > pool:
            amounts = [a * pool // busy_total for a in amounts]
    earnings = tuple(
        Earning(s.owner_id, s.node_id, a) for s, a in zip(work, amounts, strict=True)
    )
    fee = charge - sum(amounts)
    invariant(fee >= 0 and all(a >= 0 for a in amounts), "a split must not create money")
    invariant(sum(amounts) + fee == charge, "a split must conserve every micro-unit")
    return Split(charge, earnings, fee)


# ---- money as text ---------------------------------------------------------------------------


# ISO 4217 minor units of the currencies whose minor unit is not a hundredth (cents); a bank
# pays whole minor units, so payout lines are rounded down to them.
currency_minor_digits = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "UGX": 0,
                         "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3, "IQD": 3, "LYD": 3}


def minor_unit_micros(currency: str) -> int:
    """Micro-units in one minor unit of ``currency``: 10,000 for USD (a cent)."""
    digits: int = currency_minor_digits.get(currency.upper(), 2)
    return int(10 ** (6 - digits))


_plain_decimal = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # [0-9], not \d: ASCII digits only


def parse_money(text: str) -> int:
    """``"10.00"`` -> ``10_000_000`` micro-units exactly; refuses negatives and sub-micro digits.

    Plain ASCII decimals only (``12``, ``12.5``): ``Decimal`` alone also takes ``1_000``,
    non-ASCII digits (``"١٠"``), exponents and ``Infinity``, none of which an operator means
    when typing an amount."""
    text = text.strip()
    if text.startswith("-") and _plain_decimal.fullmatch(text[1:]):
        raise InvalidRequest(f"an amount must be a non-negative number, got {text!r}")
    if not _plain_decimal.fullmatch(text):
        raise InvalidRequest(f"not an amount: {text!r} (digits 0-9 with an optional "
                             "decimal point, like 10.00)")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise InvalidRequest(f"not an amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise InvalidRequest(f"an amount must be a non-negative number, got {text!r}")
    micros = value * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise InvalidRequest(f"an amount has at most 6 decimal places, got {text!r}")
    if micros > amount_micros_max:
        raise InvalidRequest(f"amount too large: {text!r}")
    return int(micros)


def format_money(micros: int, currency: str | None = None) -> str:
    """``1_230_000`` -> ``"1.23"``: at least two decimals, more only where they are not zero."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_UNIT)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    text = f"{sign}{whole}.{digits}"
    return f"{text} {currency}" if currency else text
