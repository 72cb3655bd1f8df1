"""Money through the API: balances and statements for clients and owners; prices and deposits
for the platform's admins. Amounts are integers of micro-units with their currency."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from sparecycles.api.auth import _authenticate, require_admin, require_key
from sparecycles.errors import PermissionDenied
from sparecycles.ledger.pricing import ModelPrice
from sparecycles.store import ApiKeyInfo

router = APIRouter()
statement_lines_max = 500


def _ledger(request: Request) -> Any:
    return request.app.state.coordinator.ledger


@router.get("/v1/balance")
async def client_balance(request: Request, key: ApiKeyInfo = Depends(require_key)
                         ) -> dict[str, Any]:
    """The calling client's prepaid balance, what is held for requests in flight, and what is
    available."""
    bal = await asyncio.to_thread(_ledger(request).client_balance, key.client_id)
    return {"client": key.client_name, "currency": bal.currency,
            "balance_micros": bal.balance_micros, "held_micros": bal.held_micros,
            "available_micros": bal.available_micros}


@router.get("/v1/statement")
async def client_statement(request: Request, key: ApiKeyInfo = Depends(require_key),
                           limit: int = Query(50, ge=1, le=statement_lines_max)
                           ) -> dict[str, Any]:
    statement = await asyncio.to_thread(_ledger(request).statement, client_id=key.client_id,
                                        limit=limit)
    return statement.as_dict()


@router.get("/v1/owner/statement")
async def owner_statement(request: Request,
                          limit: int = Query(50, ge=1, le=statement_lines_max)
                          ) -> dict[str, Any]:
    """An owner's earned, payable and paid balances and history (an owner-scoped key)."""
    key = await _authenticate(request)
    if "owner" not in key.scopes or key.owner_id is None:
        raise PermissionDenied("This endpoint needs an owner's key (sparecycles owners key).")
    statement = await asyncio.to_thread(_ledger(request).statement, owner_id=key.owner_id,
                                        limit=limit)
    return statement.as_dict()


class Deposit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client: str = Field(min_length=1, max_length=200, description="client name or id")
    amount_micros: int = Field(gt=0, le=10**15)
    reference: str = Field(min_length=1, max_length=200, description="makes a retry harmless")


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_micros_per_mtok: int = Field(ge=0, le=10**12)
    output_micros_per_mtok: int = Field(ge=0, le=10**12)


@router.post("/v1/admin/deposits", status_code=201)
async def deposit(body: Deposit, request: Request, _: ApiKeyInfo = Depends(require_admin)
                  ) -> dict[str, Any]:
    ledger = _ledger(request)

    def work() -> str:
        return ledger.deposit(ledger.resolve("client", body.client), body.amount_micros,
                              body.reference)

    return {"transfer_id": await asyncio.to_thread(work), "currency": ledger.currency}


@router.get("/v1/admin/prices")
async def get_prices(request: Request, _: ApiKeyInfo = Depends(require_admin)
                     ) -> dict[str, Any]:
    book = await asyncio.to_thread(_ledger(request).prices)
    return book.as_dict()


@router.put("/v1/admin/prices/{model}")
async def set_price(model: str, body: Price, request: Request,
                    _: ApiKeyInfo = Depends(require_admin)) -> dict[str, Any]:
    price = ModelPrice(body.input_micros_per_mtok, body.output_micros_per_mtok)
    await asyncio.to_thread(_ledger(request).set_price, model, price)
    return {"model": model, **body.model_dump()}
