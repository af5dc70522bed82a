"""Tests for relay.signing: the API Gateway digest signature, both sides."""

from __future__ import annotations

import base64
import hashlib
import hmac
from email.utils import formatdate

import pytest

from relay.upstream.signing import (
    ERR_EMPTY_SIGNATURE,
    ERR_INVALID_APPKEY,
    ERR_INVALID_CONTENT_MD5,
    ERR_INVALID_SIGNATURE,
    ERR_INVALID_TIMESTAMP,
    ERR_NONCE_USED,
    ERR_TIMESTAMP_EXPIRED,
    ApiGatewaySigner,
    NonceCache,
    NoSigner,
    Signer,
    canonical_resource,
    content_md5,
    error_status,
    make_signer,
    string_to_sign,
    verify_request,
)

KEY_ID = "vector-key-id"
SECRET = "vector-secret-5f3c9a"
NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
NONCE = "b7d0a9c2-5e1f-4c3a-9d8e-1f2a3b4c5d6e"
BODY = b'{"prompt_id":"8f1c2d3e-0000-4000-8000-000000000001"}'
BODY_MD5 = "+wW6aCoNmmx8n1EvKYRNqw=="
PATH = "/comfy_get_progress"

# Written out by hand from the gateway's documented layout, not produced by the module.
VECTOR_STRING_TO_SIGN = (
    "POST\n"
    "application/json; charset=utf-8\n"
    "+wW6aCoNmmx8n1EvKYRNqw==\n"
    "application/json; charset=utf-8\n"
    "Tue, 14 Nov 2023 22:13:20 GMT\n"
    "x-ca-key:vector-key-id\n"
    "x-ca-nonce:b7d0a9c2-5e1f-4c3a-9d8e-1f2a3b4c5d6e\n"
    "x-ca-signature-method:HmacSHA256\n"
    "x-ca-timestamp:1700000000000\n"
    "/comfy_get_progress"
)
VECTOR_SIGNATURE = "DuNC+WjJ26k0eTdDzSt14RG8caaaSTO4bRF8EgQqBh0="


def fixed_signer(secret: str = SECRET, now: float = NOW, nonce: str = NONCE) -> ApiGatewaySigner:
    return ApiGatewaySigner(KEY_ID, secret, clock=lambda: now, nonce=lambda: nonce)


def verify(
    headers: dict[str, str],
    body: bytes = BODY,
    path: str = PATH,
    now: float = NOW,
    seen: NonceCache | None = None,
    method: str = "POST",
) -> str | None:
    cache = NonceCache() if seen is None else seen
    return verify_request(method, path, headers, body, {KEY_ID: SECRET}, now, cache)


# --- the fixed vector -----------------------------------------------------------------


def test_fixed_vector_string_to_sign_matches_the_literal() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    assert string_to_sign("POST", headers, PATH) == VECTOR_STRING_TO_SIGN


def test_fixed_vector_signature_is_hmac_of_the_literal() -> None:
    expected = base64.b64encode(
        hmac.new(SECRET.encode(), VECTOR_STRING_TO_SIGN.encode(), hashlib.sha256).digest()
    ).decode()
    assert expected == VECTOR_SIGNATURE
    assert fixed_signer().sign("POST", PATH, BODY)["x-ca-signature"] == expected


def test_fixed_vector_headers() -> None:
    headers = fixed_signer().sign("post", PATH, BODY)
    assert headers == {
        "date": "Tue, 14 Nov 2023 22:13:20 GMT",
        "x-ca-key": KEY_ID,
        "x-ca-timestamp": "1700000000000",
        "x-ca-nonce": NONCE,
        "x-ca-signature-method": "HmacSHA256",
        "x-ca-signature-headers": "x-ca-timestamp,x-ca-key,x-ca-nonce,x-ca-signature-method",
        "Content-Type": "application/json; charset=utf-8",
        "Accept": "application/json; charset=utf-8",
        "content-md5": BODY_MD5,
        "x-ca-signature": VECTOR_SIGNATURE,
    }


# --- content-md5 and the string to sign -----------------------------------------------


def test_content_md5_is_base64_of_the_md5_of_the_body_bytes() -> None:
    assert content_md5(BODY) == BODY_MD5
    assert content_md5(BODY) == base64.b64encode(hashlib.md5(BODY).digest()).decode()
    assert fixed_signer().sign("POST", PATH, BODY)["content-md5"] == BODY_MD5


def test_empty_body_sends_no_content_md5_and_signs_an_empty_line() -> None:
    headers = fixed_signer().sign("GET", PATH, b"")
    assert "content-md5" not in headers
    assert string_to_sign("GET", headers, PATH).split("\n")[:3] == [
        "GET",
        "application/json; charset=utf-8",
        "",
    ]
    assert verify(headers, body=b"", method="GET") is None


def test_query_is_sorted_and_empty_values_keep_only_the_key() -> None:
    assert canonical_resource("/p") == "/p"
    assert canonical_resource("/p?") == "/p"
    assert canonical_resource("/p?z=1&a=2&e=&k") == "/p?a=2&e&k&z=1"
    assert canonical_resource("/p?a=1&a=2") == "/p?a=1"
    headers = {"Accept": "a", "Content-MD5": "m", "Content-Type": "t", "Date": "d"}
    assert string_to_sign("get", headers, "/p?b=2&a=1") == "GET\na\nm\nt\nd\n/p?a=1&b=2"


def test_signed_headers_are_sorted_by_name_and_looked_up_case_insensitively() -> None:
    headers = {
        "X-CA-SIGNATURE-HEADERS": "x-ca-b,x-ca-a,accept,date",
        "X-Ca-A": "1",
        "x-ca-b": "2",
        "Accept": "acc",
        "DATE": "dt",
    }
    assert string_to_sign("PUT", headers, "/x") == "PUT\nacc\n\n\ndt\nx-ca-a:1\nx-ca-b:2\n/x"


# --- fresh values per call ------------------------------------------------------------


def test_fresh_nonce_and_timestamp_on_every_call() -> None:
    ticks = iter([NOW, NOW + 1.5])
    signer = ApiGatewaySigner(KEY_ID, SECRET, clock=lambda: next(ticks))
    first = signer.sign("POST", PATH, BODY)
    second = signer.sign("POST", PATH, BODY)
    assert first["x-ca-nonce"] != second["x-ca-nonce"]
    assert (first["x-ca-timestamp"], second["x-ca-timestamp"]) == ("1700000000000", "1700000001500")
    assert first["x-ca-signature"] != second["x-ca-signature"]


def test_default_nonce_is_a_uuid_and_default_clock_is_now() -> None:
    import time
    import uuid

    headers = ApiGatewaySigner(KEY_ID, SECRET).sign("POST", PATH, BODY)
    assert str(uuid.UUID(headers["x-ca-nonce"])) == headers["x-ca-nonce"]
    assert abs(int(headers["x-ca-timestamp"]) - time.time() * 1000) < 60_000


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", PATH, BODY),
        ("post", "/scc/comfy_get_result", b'{"taskId":"t"}'),
        ("GET", "/p?z=1&a=2&e=&k", b""),
        ("PUT", "/base/scc/comfy_get_progress", '{"taskId":"é"}'.encode()),
    ],
)
def test_sign_signs_what_string_to_sign_builds_from_its_headers(
    method: str, path: str, body: bytes
) -> None:
    """sign writes its string to sign out directly; it must be string_to_sign's."""
    ticks = iter([NOW, NOW + 0.4, NOW + 1.7])
    signer = ApiGatewaySigner("ключ-id", SECRET, clock=lambda: next(ticks))
    for _ in range(3):  # the cached date, then a new second
        headers = signer.sign(method, path, body)
        expected = hmac.new(
            SECRET.encode(), string_to_sign(method, headers, path).encode(), hashlib.sha256
        ).digest()
        assert headers["x-ca-signature"] == base64.b64encode(expected).decode()
        assert headers["date"] == formatdate(int(headers["x-ca-timestamp"]) / 1000, usegmt=True)


# --- the gateway side -----------------------------------------------------------------


def test_verify_accepts_a_signed_request() -> None:
    assert verify(fixed_signer().sign("POST", PATH, BODY)) is None


def test_verify_headers_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in fixed_signer().sign("POST", PATH, BODY).items()}
    assert verify(headers) is None


def test_verify_accepts_a_signed_query() -> None:
    path = "/comfy_get_progress?task=42&a=1"
    assert verify(fixed_signer().sign("GET", path, b""), body=b"", path=path, method="GET") is None


def test_verify_refuses_a_tampered_body() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    tampered = BODY.replace(b"0001", b"0002")
    assert verify(headers, body=tampered) == ERR_INVALID_CONTENT_MD5
    # Even with a matching content-md5, the signature no longer fits.
    headers["content-md5"] = content_md5(tampered)
    result = verify(headers, body=tampered)
    assert result is not None and result.startswith(ERR_INVALID_SIGNATURE)


def test_verify_refuses_a_missing_content_md5_or_one_sent_with_no_body() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    assert verify(headers, body=b"") == ERR_INVALID_CONTENT_MD5
    del headers["content-md5"]
    assert verify(headers) == ERR_INVALID_CONTENT_MD5


def test_verify_refuses_a_tampered_path_or_method() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    for result in (verify(headers, path="/other"), verify(headers, method="PUT")):
        assert result is not None and result.startswith(ERR_INVALID_SIGNATURE)


def test_verify_refuses_a_wrong_secret_and_shows_the_server_string_to_sign() -> None:
    result = verify(fixed_signer(secret="not-the-secret").sign("POST", PATH, BODY))
    assert result == (
        "Invalid Signature, Server StringToSign:`" + VECTOR_STRING_TO_SIGN.replace("\n", "#") + "`"
    )
    assert "\n" not in result
    assert SECRET not in result
    assert error_status(result) == 400


def test_verify_refuses_an_unknown_or_missing_key() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    cache = NonceCache()
    assert verify_request("POST", PATH, headers, BODY, {"other": SECRET}, NOW, cache) == (
        ERR_INVALID_APPKEY
    )
    del headers["x-ca-key"]
    assert verify(headers) == "Header `X-Ca-Key` is Required"


def test_verify_refuses_a_missing_signature_with_404() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    del headers["x-ca-signature"]
    assert verify(headers) == ERR_EMPTY_SIGNATURE
    assert error_status(ERR_EMPTY_SIGNATURE) == 404


def test_verify_refuses_an_unsupported_signature_method() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    headers["x-ca-signature-method"] = "HmacSHA1"
    result = verify(headers)
    assert result is not None and result.startswith("Invalid Header `X-Ca-Signature-Method`")


def test_verify_refuses_a_timestamp_16_minutes_old_or_ahead() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    assert verify(headers, now=NOW + 16 * 60) == ERR_TIMESTAMP_EXPIRED
    assert verify(headers, now=NOW - 16 * 60) == ERR_TIMESTAMP_EXPIRED
    assert verify(headers, now=NOW + 14 * 60) is None


def test_verify_refuses_a_malformed_or_missing_timestamp() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    headers["x-ca-timestamp"] = "yesterday"
    assert verify(headers) == ERR_INVALID_TIMESTAMP
    del headers["x-ca-timestamp"]
    assert verify(headers) == "Header `X-Ca-Timestamp` is Required"


def test_verify_refuses_a_reused_nonce() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    cache = NonceCache()
    assert verify(headers, seen=cache) is None
    assert verify(headers, seen=cache) == ERR_NONCE_USED
    # A new nonce, freshly signed, is fine.
    assert verify(fixed_signer(nonce="another").sign("POST", PATH, BODY), seen=cache) is None


def test_a_refused_request_does_not_burn_its_nonce() -> None:
    good = fixed_signer().sign("POST", PATH, BODY)
    bad = fixed_signer(secret="wrong").sign("POST", PATH, BODY)
    cache = NonceCache()
    assert verify(bad, seen=cache) is not None
    assert verify(good, seen=cache) is None


def test_verify_refuses_a_missing_nonce() -> None:
    headers = fixed_signer().sign("POST", PATH, BODY)
    del headers["x-ca-nonce"]
    assert verify(headers) == "Header `X-Ca-Nonce` is Required"


# --- the nonce cache ------------------------------------------------------------------


def test_nonce_cache_is_bounded_in_count() -> None:
    cache = NonceCache(max_entries=3)
    for n in "abcd":
        assert cache.add(n, NOW)
    assert len(cache) == 3
    assert "a" not in cache and "d" in cache


def test_nonce_cache_forgets_after_its_ttl() -> None:
    cache = NonceCache(ttl_seconds=60)
    assert cache.add("x", NOW)
    assert not cache.add("x", NOW + 59)
    assert cache.add("x", NOW + 61)
    with pytest.raises(ValueError):
        NonceCache(max_entries=0)


# --- the secret stays secret ----------------------------------------------------------


def test_secret_never_in_repr_str_or_any_header_value() -> None:
    signer = fixed_signer()
    assert SECRET not in repr(signer)
    assert SECRET not in str(signer)
    assert KEY_ID in repr(signer)
    for body in (BODY, b"", SECRET.encode()):
        for value in signer.sign("POST", PATH, body).values():
            assert SECRET not in value
    for maker in (make_signer("apigw", KEY_ID, SECRET), make_signer("none", KEY_ID, SECRET)):
        assert SECRET not in repr(maker)


# --- choosing a signer ----------------------------------------------------------------


def test_make_signer_apigw_with_a_key_pair_signs() -> None:
    signer = make_signer("apigw", KEY_ID, SECRET)
    assert isinstance(signer, ApiGatewaySigner)
    assert isinstance(signer, Signer)
    assert isinstance(make_signer(" APIGW ", KEY_ID, SECRET), ApiGatewaySigner)
    assert isinstance(make_signer(access_key_id=KEY_ID, access_key_secret=SECRET), ApiGatewaySigner)


def test_make_signer_apigw_without_a_key_pair_falls_back_to_no_signer() -> None:
    for key_id, secret in ((None, None), (KEY_ID, None), (None, SECRET), ("", "")):
        signer = make_signer("apigw", key_id, secret)
        assert isinstance(signer, NoSigner)
        assert isinstance(signer, Signer)
    assert make_signer("apigw", None, None).sign("POST", PATH, BODY) == {}
    assert make_signer("apigw", KEY_ID, None).sign("POST", PATH, BODY) == {"x-ca-key": KEY_ID}


def test_make_signer_none_adds_only_the_key_id() -> None:
    assert make_signer("none", KEY_ID, SECRET).sign("POST", PATH, BODY) == {"x-ca-key": KEY_ID}
    assert make_signer("none", None, None).sign("GET", PATH, b"") == {}
    assert NoSigner().sign("GET", PATH, b"") == {}


def test_make_signer_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown signing scheme 'hmac'"):
        make_signer("hmac", KEY_ID, SECRET)


def test_api_gateway_signer_needs_both_halves_of_the_pair() -> None:
    with pytest.raises(ValueError):
        ApiGatewaySigner(KEY_ID, "")
    with pytest.raises(ValueError):
        ApiGatewaySigner("", SECRET)
