"""The node protocol: typed messages, strict on what matters, tolerant of unknown fields."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparecycles import limits, protocol
from sparecycles.errors import ProtocolError
from sparecycles.identity import NodeIdentity, node_id_for, verify
from sparecycles.protocol import b64, unb64


def _hello(**over: object) -> dict:
    ident = NodeIdentity.generate()
    msg = {
        "type": "hello",
        "v": 1,
        "token": "nt-sc-abcdefgh",
        "public_key": ident.public_key_b64,
        "profile": {"device_class": "laptop"},
        "models": [{"name": "tiny", "weights_sha256": "a" * 64}],
    }
    msg.update(over)
    return msg


def test_hello_round_trip_ignores_unknown_fields() -> None:
    raw = json.dumps(_hello(future_field={"x": 1}))
    msg = protocol.decode_node_message(raw)
    assert isinstance(msg, protocol.Hello)
    assert msg.models[0].name == "tiny"


@pytest.mark.parametrize(
    "raw, needle",
    [
        ("not json", "not JSON"),
        ("[1,2]", "JSON object"),
        (json.dumps({"type": "nope"}), "invalid message"),
        (json.dumps({"type": "tokens", "job_id": "j", "attempt": 1, "index": 0,
                     "token_ids": []}), "token_ids"),
        (json.dumps({"type": "tokens", "job_id": "j", "attempt": 1, "index": -1,
                     "token_ids": [1]}), "index"),
        (json.dumps({"type": "heartbeat", "v": 99}), "version"),
        (json.dumps(_hello(models=[{"name": "tiny", "weights_sha256": "xyz"}])), "models"),
    ],
)
def test_bad_messages_are_protocol_errors(raw: str, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        protocol.decode_node_message(raw)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode_node_message("x" * (limits.ws_message_bytes_max + 1))


def test_too_many_tokens_in_one_message() -> None:
    raw = json.dumps({"type": "tokens", "job_id": "j", "attempt": 1, "index": 0,
                      "token_ids": [1] * (limits.tokens_per_message_max + 1)})
    with pytest.raises(ProtocolError):
        protocol.decode_node_message(raw)


@settings(deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
        | st.text(max_size=20),
        lambda children: st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(["type", "v", "job_id", "attempt", "index",
                                           "token_ids", "metering", "signature", "token"]),
                          children, max_size=6),
        max_leaves=20,
    ).map(json.dumps),
))
def test_hostile_input_never_escapes_as_anything_but_protocol_error(raw: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode_node_message(raw)


def test_signed_result_verifies_and_tampering_does_not() -> None:
    ident = NodeIdentity.generate()
    metering = protocol.Metering(prompt_tokens=5, completion_tokens=3,
                                 time_to_first_token_s=0.1, total_s=0.3, busy_s=0.2)
    fields = dict(job_id="job_1", attempt=1, weights_sha256="a" * 64,
                  prompt_sha256=protocol.tokens_sha256([1, 2, 3]),
                  output_sha256=protocol.tokens_sha256([4, 5, 6]),
                  finish_reason="stop", metering=metering)
    sig = ident.sign(protocol.result_payload(**fields))
    assert verify(ident.public_key_b64, protocol.result_payload(**fields), sig)
    more = metering.model_copy(update={"completion_tokens": 30})
    assert not verify(ident.public_key_b64, protocol.result_payload(**{**fields,
                                                                       "metering": more}), sig)
    other = NodeIdentity.generate()
    assert not verify(other.public_key_b64, protocol.result_payload(**fields), sig)
    assert not verify(ident.public_key_b64, protocol.result_payload(**fields), "garbage!")


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=600), flip=st.integers(min_value=0, max_value=64 * 8 - 1))
def test_the_check_agrees_with_openssl_on_signatures_good_and_bad(payload: bytes,
                                                                  flip: int) -> None:
    """``verify`` (libsodium) accepts exactly what OpenSSL's Ed25519 accepts for keys a node
    makes: its own signatures, and none with one bit changed in the signature or the payload."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    ident = NodeIdentity.generate()
    sig = unb64(ident.sign(payload))
    openssl_key = Ed25519PublicKey.from_public_bytes(unb64(ident.public_key_b64))

    def openssl(p: bytes, s: bytes) -> bool:
        try:
            openssl_key.verify(s, p)
        except InvalidSignature:
            return False
        return True

    bad_sig = bytearray(sig)
    bad_sig[flip // 8] ^= 1 << (flip % 8)
    cases = [(payload, sig), (payload, bytes(bad_sig)), (payload + b"!", sig)]
    if payload:
        cases.append((bytes([payload[0] ^ 1]) + payload[1:], sig))
    for p, s in cases:
        assert verify(ident.public_key_b64, p, b64(s)) == openssl(p, s)
    assert verify(ident.public_key_b64, payload, b64(sig))
    assert not verify(ident.public_key_b64, payload, b64(sig[:63]))  # wrong sizes: refused
    assert not verify(b64(unb64(ident.public_key_b64)[:31]), payload, b64(sig))


def test_node_id_is_derived_from_the_key(tmp_path) -> None:
    path = tmp_path / "cfg" / "node_key.pem"
    first = NodeIdentity.load_or_create(path)
    again = NodeIdentity.load_or_create(path)
    assert first.node_id == again.node_id == node_id_for(first.public_key_b64)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_verification_messages_round_trip_and_refuse_non_finite_scores() -> None:
    score = protocol.Score(score_id="scr_1", model="tiny", prompt_token_ids=[1, 2],
                           output_token_ids=[3], temperature=0.0)
    assert protocol.decode_coordinator_message(protocol.encode(score)) == score
    job = protocol.decode_coordinator_message(json.dumps(
        {"type": "job", "job_id": "j", "attempt": 1, "model": "m", "prompt_token_ids": [1],
         "sampling": {"max_tokens": 2}, "prompt_sha256": "x"}))
    assert job.want_logprobs is False  # an older coordinator's job: no log-probabilities
    scored = protocol.Scored(score_id="scr_1", logprobs=[-0.5], top_logprobs=[-0.5],
                             mass_above=[0.0], expected_logprobs=[-0.5], logprob_vars=[0.0])
    assert protocol.decode_node_message(protocol.encode(scored)) == scored
    for bad in ("NaN", "Infinity"):
        with pytest.raises(ProtocolError):
            protocol.decode_node_message(
                '{"type":"scored","score_id":"s","logprobs":[' + bad + "]}")
    too_many = {"type": "scored", "score_id": "s",
                "logprobs": [0.0] * (limits.score_tokens_max + 1)}
    with pytest.raises(ProtocolError):
        protocol.decode_node_message(json.dumps(too_many))


_DONE = ('{"type":"done","job_id":"j","attempt":1,"finish_reason":"stop","output_sha256":"'
         + "0" * 64 + '","signature":"' + "A" * 88 + '","metering":{"prompt_tokens":1,'
         '"completion_tokens":1,"time_to_first_token_s":0.1,"total_s":0.2,"busy_s":0.1,'
         '"energy_j":ENERGY}}')


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_no_nan_or_infinity_anywhere_in_the_protocol(literal: str) -> None:
    """One ``"energy_j": Infinity`` once made every cost report of the month crash."""
    protocol.decode_node_message(_DONE.replace("ENERGY", "1.5"))  # the honest twin decodes
    with pytest.raises(ProtocolError):
        protocol.decode_node_message(_DONE.replace("ENERGY", literal))
    hello = {"type": "hello", "token": "t" * 10, "public_key": "k" * 44, "models": [],
             "profile": {"device_class": "laptop", "power_busy_w": 1.0}}
    raw = json.dumps(hello).replace("1.0", literal)
    with pytest.raises(ProtocolError):  # inside a free-form dict too
        protocol.decode_node_message(raw)


def test_wire_models_refuse_non_finite_floats_when_built_in_python() -> None:
    with pytest.raises(ValueError):
        protocol.Metering(prompt_tokens=1, completion_tokens=1, time_to_first_token_s=0.0,
                          total_s=0.0, busy_s=float("inf"))
    with pytest.raises(ValueError):
        protocol.Heartbeat(temperature_c=float("nan"))
