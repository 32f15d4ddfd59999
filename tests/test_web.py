"""The framework-free web pieces: the token carrier and the per-method resolver (pure logic)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sqlalchemy_scale as ss
from sqlalchemy_scale.web import TokenCarrier, resolve_role, role_for_method


def test_read_methods_use_replicas_and_the_rest_the_primary() -> None:
    """GET, HEAD and OPTIONS (any case) resolve to replica; every other method to primary."""
    assert [role_for_method(m) for m in ("GET", "head", "Options")] == ["replica"] * 3
    assert [role_for_method(m) for m in ("POST", "PUT", "PATCH", "DELETE", "TRACE")] == [
        "primary"
    ] * 5


def test_a_resolver_that_returns_no_role_is_refused() -> None:
    """A custom resolver's answer is checked: only 'primary' and 'replica' are roles."""
    assert resolve_role(lambda method: "primary", "GET") == "primary"
    with pytest.raises(ss.ConfigurationError, match="returned 'write' for a POST request"):
        resolve_role(lambda method: "write", "POST")  # type: ignore[arg-type,return-value]


def test_the_newest_valid_token_wins_across_carriers() -> None:
    """Between a cookie and a header the later WAL position is used, whichever carries it."""
    carrier = TokenCarrier()
    assert carrier.read(cookies=["0/20"], headers=["0/10"]) == "0/20"
    assert carrier.read(cookies=["0/10"], headers=["1/0"]) == "1/0"
    assert carrier.read(cookies=["0/10", "0/30"]) == "0/30"
    assert carrier.read() is None


def test_invalid_values_are_ignored_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    """A malformed value is logged and ignored; a valid token in the other carrier applies."""
    carrier = TokenCarrier()
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_scale.web"):
        assert carrier.read(cookies=["nope"], headers=["0/AB"]) == "0/AB"
        assert carrier.read(cookies=["0/1\r\nX: y"], headers=["", "1/2/3"]) is None
    assert caplog.text.count("ignored the causal token") == 3
    assert "\\r\\n" in caplog.text  # control characters are escaped in the log


def test_signed_tokens_reject_forgeries() -> None:
    """With a secret_key, tokens go out signed and only values signed with that key are read."""
    carrier = TokenCarrier(secret_key="k1")
    value = carrier.encode("0/16B3748")
    assert value.startswith("0/16B3748.") and carrier.decode(value) == "0/16B3748"
    assert carrier.decode("0/16B3748") is None  # unsigned
    assert carrier.decode(TokenCarrier(secret_key="k2").encode("0/16B3748")) is None
    forged = value.replace("0/16B3748", "FFFFFFFF/FFFFFFFF")
    assert carrier.decode(forged) is None
    assert TokenCarrier().decode(value) is None  # signed, but this carrier has no key
    assert carrier.decode("0/16B3748.\u00e9\u00e9") is None  # not even ASCII: still just ignored


def test_set_cookie_attributes() -> None:
    """The cookie is HttpOnly, SameSite=Lax, on the configured path, Secure only over https."""
    carrier = TokenCarrier(cookie_name="tok", header_name="X-Tok", cookie_max_age=600)
    assert carrier.set_cookie_header("0/AB", secure=False) == (
        "tok=0/AB; Path=/; Max-Age=600; HttpOnly; SameSite=Lax"
    )
    assert carrier.set_cookie_header("0/AB", secure=True).endswith("; Secure")
    assert carrier.response_headers("0/AB", secure=False)[1] == ("X-Tok", "0/AB")
    with pytest.raises(ss.ConfigurationError, match="not a causal token"):
        carrier.encode("0/AB; Domain=evil")


def test_cookie_header_parsing_finds_every_value_of_the_name() -> None:
    """Only this carrier's cookie is read from a Cookie header, every occurrence, unquoted."""
    carrier = TokenCarrier()
    header = 'a=1; scale_token=0/1;scale_token="0/2"; xscale_token=0/9; scale_token'
    assert carrier.read_cookie_header(header) == ["0/1", "0/2"]
    assert carrier.read_cookie_header(None) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cookie_name": "bad name"}, "cookie_name must be an HTTP token"),
        ({"header_name": "X-Tok:"}, "header_name must be an HTTP token"),
        ({"cookie_path": "relative"}, "cookie_path must be an absolute path"),
        ({"cookie_max_age": 0}, "cookie_max_age must be positive"),
        ({"secret_key": ""}, "secret_key must not be empty"),
    ],
)
def test_bad_carrier_configuration_is_refused(kwargs: dict[str, object], match: str) -> None:
    """Names that cannot be cookies or headers, and other bad settings, raise at construction."""
    with pytest.raises(ss.ConfigurationError, match=match):
        TokenCarrier(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    cookie=st.text(max_size=80),
    header=st.text(max_size=80),
    signed=st.booleans(),
)
def test_no_carrier_value_raises(cookie: str, header: str, signed: bool) -> None:
    """Whatever a client sends, reading the carriers never raises, and what it returns is a
    token that one of the values held."""
    carrier = TokenCarrier(secret_key="k" if signed else None)
    cookies = carrier.read_cookie_header(f"scale_token={cookie}")
    token = carrier.read(cookies=cookies, headers=[header])
    if token is not None:
        assert ss.newer_token(token, "0/0") == token
        assert any(v.strip().strip('"').startswith(token) for v in [*cookies, header])
