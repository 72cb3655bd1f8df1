"""The client API's fast path (api/fastpath.py) answers exactly as the framework's routes do.

Each request below is sent twice, to the framework's application alone and to the same
application behind ``ClientFastPath``, and the two answers must be the same status, headers that
matter and body; for the requests the fast path serves itself, the framework is not called.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from routes_coordinator import RecordingCoordinator

from sparecycles.api import errors, fastpath, openai_routes

limit_bytes = 4096


class Counting:
    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.calls += 1
        await self.app(scope, receive, send)


@pytest.fixture
def apis():
    coord = RecordingCoordinator()
    app = FastAPI()
    app.state.coordinator = coord
    errors.install(app)
    app.add_middleware(errors.BodySizeLimit, limit_bytes=limit_bytes)
    app.include_router(openai_routes.router)
    framework = Counting(app)
    fast = fastpath.ClientFastPath(framework, coord, limit_bytes)  # type: ignore[arg-type]
    _, user = coord.store.create_api_key("acme", "prod")
    _, admin = coord.store.create_api_key("ops", "admin", ("admin",))
    with TestClient(app) as plain, TestClient(fast) as front:
        yield plain, front, framework, coord, user, admin
    coord.store.close()


chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
completion = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4}


def _cases(user: str, admin: str) -> list[tuple[str, str, dict[str, str], bytes, bool]]:
    """(name, path, headers, body, served by the fast path itself)."""
    auth = {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}
    js = json.dumps
    return [
        ("valid chat: 503 from dispatch", "/v1/chat/completions", auth, js(chat).encode(), True),
        ("valid stream", "/v1/chat/completions", auth, js({**chat, "stream": True}).encode(),
         True),
        ("valid completion", "/v1/completions", auth, js(completion).encode(), True),
        ("no key", "/v1/chat/completions", {"Content-Type": "application/json"},
         js(chat).encode(), True),
        ("wrong key", "/v1/chat/completions", {**auth, "Authorization": "Bearer sk-sc-nope"},
         js(chat).encode(), True),
        ("no inference scope", "/v1/chat/completions",
         {**auth, "Authorization": f"Bearer {admin}"}, js(chat).encode(), True),
        ("unknown model", "/v1/chat/completions", auth, js({**chat, "model": "x"}).encode(),
         True),
        ("unsupported parameter", "/v1/chat/completions", auth,
         js({**chat, "frobnicate": 1}).encode(), True),
        ("no content type", "/v1/chat/completions", {"Authorization": auth["Authorization"]},
         js(chat).encode(), False),
        ("JSON with a charset", "/v1/chat/completions",
         {**auth, "Content-Type": "Application/JSON; charset=utf-8"}, js(chat).encode(), True),
        ("bad JSON", "/v1/chat/completions", auth, b'{"model": ', False),
        ("bad JSON, no key", "/v1/chat/completions", {"Content-Type": "application/json"},
         b"{", False),
        ("empty body", "/v1/chat/completions", auth, b"", False),
        ("a list, not an object", "/v1/chat/completions", auth, b"[1, 2]", False),
        ("a field of the wrong type", "/v1/chat/completions", auth,
         js({**chat, "temperature": "hot"}).encode(), False),
        ("out of range", "/v1/completions", auth, js({**completion, "n": 10**6}).encode(),
         False),
        ("invalid body, no key", "/v1/chat/completions", {"Content-Type": "application/json"},
         js({"model": ""}).encode(), True),
        ("text/plain", "/v1/chat/completions", {**auth, "Content-Type": "text/plain"},
         js(chat).encode(), False),
        ("too large", "/v1/chat/completions", auth,
         js({**chat, "user": "x" * limit_bytes}).encode(), False),
        ("a lone surrogate in a message", "/v1/chat/completions", auth,
         js({**chat, "messages": [{"role": "user", "content": "hi \ud800"}]}).encode(), True),
        ("a lone surrogate in a stop string", "/v1/chat/completions", auth,
         js({**chat, "stop": ["\udfff"]}).encode(), True),
        ("a lone surrogate in a prompt", "/v1/completions", auth,
         js({**completion, "prompt": "\ud83c alone"}).encode(), True),
        # clients (LiteLLM, some SDKs) send null for what they leave unset: the default, as
        # OpenAI takes it (a 400 "Input should be a valid integer" before)
        ("null for every field left unset", "/v1/chat/completions", auth,
         js({**chat, **dict.fromkeys(
             ("n", "stream", "logprobs", "parallel_tool_calls", "top_k", "min_tokens",
              "ignore_eos", "trusted_only", "temperature", "top_p", "seed", "stop",
              "top_logprobs", "tools", "tool_choice", "response_format", "stream_options",
              "max_completion_tokens", "logit_bias", "user"))}).encode(), True),
        ("null for a completion's echo and n", "/v1/completions", auth,
         js({**completion, "echo": None, "n": None, "best_of": None}).encode(), True),
        ("a surrogate pair is one character", "/v1/chat/completions", auth,
         js({**chat, "messages": [{"role": "user", "content": "\U0001f31f"}]}).encode(), True),
    ]


def test_the_fast_path_answers_as_the_framework_does(apis) -> None:
    plain, front, framework, coord, user, admin = apis
    for name, path, headers, body, served in _cases(user, admin):
        want = plain.post(path, headers=headers, content=body)
        before = framework.calls
        got = front.post(path, headers=headers, content=body)
        assert (got.status_code, got.json()) == (want.status_code, want.json()), name
        assert got.headers.get("content-type") == want.headers.get("content-type"), name
        assert got.headers.get("retry-after") == want.headers.get("retry-after"), name
        # the fast path served it itself, or handed a bad body to the framework
        assert (framework.calls == before) == served, name
    assert coord.admitted  # the valid requests reached dispatch through both


def test_other_routes_and_methods_go_to_the_framework(apis) -> None:
    plain, front, framework, _coord, user, _admin = apis
    auth = {"Authorization": f"Bearer {user}"}
    for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/chat/completions/"),
                         ("GET", "/v1/models")):
        want = plain.request(method, path, headers=auth, follow_redirects=False)
        before = framework.calls
        got = front.request(method, path, headers=auth, follow_redirects=False)
        assert (got.status_code, got.content) == (want.status_code, want.content), path
        assert framework.calls == before + 1


def test_a_database_outage_is_a_503_and_a_bug_a_500(apis, monkeypatch) -> None:
    plain, front, _framework, coord, user, _admin = apis
    headers = {"Authorization": f"Bearer {user}"}
    coord.store_away = True
    want = plain.post("/v1/chat/completions", headers=headers, json=chat)
    got = front.post("/v1/chat/completions", headers=headers, json=chat)
    assert got.status_code == want.status_code == 503
    assert got.json() == want.json() and got.headers["retry-after"] == "1"
    coord.store_away = False

    async def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(coord.gate, "admit", broken)
    got = front.post("/v1/completions", headers=headers, json=completion)
    assert got.status_code == 500
    assert got.json()["error"]["type"] == "server_error" and "bug" not in got.text


def test_text_that_is_not_unicode_is_a_400_naming_its_field(apis) -> None:
    """JSON's escapes can carry a lone UTF-16 surrogate, which no tokenizer or node message can
    take: refused at the boundary (it was a 500, or a job that failed after a minute)."""
    plain, front, _framework, coord, user, _admin = apis
    headers = {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}
    admitted = len(coord.admitted)
    for path, body, param in (
            ("/v1/chat/completions",
             {**chat, "messages": [{"role": "user", "content": "ok"},
                                   {"role": "user", "content": [{"type": "text",
                                                                 "text": "x\ud800"}]}]},
             "messages.1.content.0.text"),
            ("/v1/chat/completions", {**chat, "stop": "\ud800"}, "stop"),
            ("/v1/chat/completions", {**chat, "user": "\udc00"}, "user"),
            ("/v1/completions", {**completion, "prompt": ["fine", "\udbff"]}, "prompt.1")):
        for client in (plain, front):
            r = client.post(path, headers=headers, content=json.dumps(body).encode())
            assert r.status_code == 400, (path, param, r.text)
            err = r.json()["error"]
            assert (err["param"], err["code"], err["type"]) == (
                param, "invalid_value", "invalid_request_error"), r.text
            assert "surrogate" in err["message"]
    assert len(coord.admitted) == admitted  # none reached dispatch


def test_the_responses_api_refuses_text_that_is_not_unicode() -> None:
    from sparecycles.api.responses_routes import ResponsesRequest
    from sparecycles.errors import InvalidRequest

    body = {"model": "tiny", "input": [{"role": "user", "content": "a \udfff b"}]}
    with pytest.raises(InvalidRequest) as caught:
        ResponsesRequest.model_validate(body)
    assert caught.value.param == "input.0.content"
    assert ResponsesRequest.model_validate({"model": "tiny", "input": "\U0001f31f"}).input
    nulls = ResponsesRequest.model_validate({"model": "tiny", "input": "hi", "stream": None,
                                             "parallel_tool_calls": None})
    assert (nulls.stream, nulls.parallel_tool_calls) == (False, True)


def test_unknown_keys_in_nested_objects_are_refused_not_ignored(apis) -> None:
    """OpenAI's nested request objects have fixed fields: another key did nothing before (a
    schema beside json_object gave unconstrained JSON), now a 400 naming it."""
    plain, front, _framework, coord, user, _admin = apis
    headers = {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}
    fn = {"name": "f", "parameters": {"type": "object"}}
    admitted = len(coord.admitted)
    for body, param in (
            ({**chat, "stream_options": {"include_usage": True}}, "stream_options"),
            ({**chat, "response_format": {"type": "json_object", "schema": {}}},
             "response_format.schema"),
            ({**chat, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {}, "format": "y"}}}, "response_format.json_schema.format"),
            ({**chat, "tools": [{"type": "function", "function": {**fn, "examples": [1]}}]},
             "tools.0.function.examples"),
            ({**chat, "stream": True, "stream_options": {"include_obfuscation": True}},
             "stream_options.include_obfuscation"),
            # the unknown key itself is named, whatever it looks like
            ({**chat, "response_format": {"type": "json_object", "Schema": {}}},
             "response_format.Schema"),
            ({**chat, "tools": [{"type": "function", "function": {**fn, "x-order": 1}}]},
             "tools.0.function.x-order")):
        for client in (plain, front):
            r = client.post("/v1/chat/completions", headers=headers,
                            content=json.dumps(body).encode())
            assert r.status_code == 400, (param, r.text)
            assert r.json()["error"]["param"] == param, r.text
    assert len(coord.admitted) == admitted
    ok = {**chat, "stream": True, "stream_options": {"include_usage": True,
                                                     "include_obfuscation": False},
          "tools": [{"type": "function", "function": {**fn, "strict": True,
                                                      "description": "d"}}]}
    from sparecycles.api.schemas import ChatCompletionRequest

    valid = ChatCompletionRequest.model_validate(ok)  # OpenAI's own fields still pass
    assert valid.tools and valid.tools[0].function.strict and valid.include_usage
    nulls = ChatCompletionRequest.model_validate({**chat, "stream": True,
                                                  "stream_options": {"include_usage": None}})
    assert not nulls.include_usage


def test_the_responses_api_takes_openais_text_options() -> None:
    from sparecycles.api.responses_routes import ResponsesRequest

    ok = ResponsesRequest.model_validate({"model": "tiny", "input": "hi", "text": {
        "verbosity": "medium", "format": {"type": "json_schema", "name": "x", "schema": {},
                                          "description": "d", "strict": True}}})
    assert ok.text is not None and ok.text.verbosity == "medium"
    with pytest.raises(ValueError):  # what this server cannot do is refused, not ignored
        ResponsesRequest.model_validate({"model": "tiny", "input": "hi",
                                         "text": {"verbosity": "low"}})


def test_a_400_names_the_field_not_pydantics_union_member(apis) -> None:
    """``param`` is the request's field; pydantic's names for the member of a union it tried
    ("stop.str", "tool_choice.literal[...]", "messages.0.content.str") were leaking into it."""
    plain, front, _framework, _coord, user, _admin = apis
    headers = {"Authorization": f"Bearer {user}", "Content-Type": "application/json"}
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    for body, param in (({**chat, "stop": 5}, "stop"),
                        ({**chat, "tool_choice": "any"}, "tool_choice"),
                        ({**chat, "messages": [{"role": "user", "content": image}]},
                         "messages.0.content"),
                        ({**chat, "temperature": "hot"}, "temperature")):
        for client in (plain, front):
            r = client.post("/v1/chat/completions", headers=headers,
                            content=json.dumps(body).encode())
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
