"""A stand-in coordinator for testing the client API's routes without nodes: it admits through
the real key store, records each job the route asks its dispatcher to admit, and then refuses
it (no node), so a test sees exactly what the route decided and the answer it gives then.

Importable from unit tests (``tests/unit`` is the test modules' directory on ``sys.path``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sqlalchemy.exc import OperationalError

from sparecycles.errors import ModelNotFound, NoNodeAvailable
from sparecycles.store import Store


class _Tokenizer:
    eos_token_id = None

    def __len__(self) -> int:
        return 1000


class RecordingCoordinator:
    """Serves one model, ``tiny`` (2,048 tokens of context); ``store_away`` makes key lookups
    fail as a locked database does."""

    def __init__(self) -> None:
        self.store = Store("sqlite://")
        self.store.create_all()
        self.admitted: list[dict[str, Any]] = []
        self.store_away = False
        self.started_at_s = 0.0
        spec = SimpleNamespace(context_length=2048)
        self.models = {"tiny": spec}
        self.gate = SimpleNamespace(admit=self._gate_admit, release=lambda job_id: None)
        self.dispatcher = SimpleNamespace(admit=self._admit)
        self._model = (spec, _Tokenizer())

    def model(self, name: str) -> Any:
        if name not in self.models:
            raise ModelNotFound(f"The model '{name}' does not exist")
        return self._model

    async def _gate_admit(self, *args: Any) -> Any:
        return SimpleNamespace(trusted_only=False)

    async def _admit(self, **kw: Any) -> Any:
        self.admitted.append(kw)
        raise NoNodeAvailable("no node in this test")

    def cached_key(self, secret: str) -> tuple[bool, Any]:
        return False, None

    def authenticate(self, secret: str) -> Any:
        if self.store_away:
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return self.store.authenticate_key(secret)
