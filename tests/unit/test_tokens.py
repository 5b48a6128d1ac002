"""Service token validation: every refusal names its reason; JWKS caching, rotation and rate limiting."""
import base64
import hashlib
import hmac
import http.server
import json
import os
import threading

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from enforcer.tokens import JWKSError, TokenError, TokenVerifier

ISS = "https://issuer.test"
AUD = "customers-db"
NOW = 1_700_000_000


def _jwk(public_key, kid=None, alg=None) -> dict:
    if isinstance(public_key, rsa.RSAPublicKey):
        d = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        d = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        d = jwt.algorithms.OKPAlgorithm.to_jwk(public_key, as_dict=True)
    d.pop("kid", None)
    if kid is not None:
        d["kid"] = kid
    if alg is not None:
        d["alg"] = alg
    return d


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa_other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }


def write_jwks(path, entries) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"keys": entries}, f)
    os.replace(tmp, path)     # a new inode: the verifier notices even within one mtime tick


@pytest.fixture
def jwks_file(tmp_path, keys):
    path = tmp_path / "jwks.json"
    write_jwks(path, [_jwk(keys["rsa"].public_key(), "rsa-1"), _jwk(keys["ec"].public_key(), "ec-1"),
                      _jwk(keys["ed"].public_key(), "ed-1")])
    return str(path)


class Clock:
    def __init__(self):
        self.wall = float(NOW)
        self.mono = 1000.0

    def time(self):
        return self.wall

    def monotonic(self):
        return self.mono


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def verifier(jwks_file, clock):
    return TokenVerifier(ISS, AUD, jwks_file, clock=clock.time, monotonic=clock.monotonic)


def claims(**over):
    c = {"iss": ISS, "aud": AUD, "sub": "etl-job", "iat": NOW - 10, "exp": NOW + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def sign(key, alg="RS256", kid="rsa-1", **over):
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**over), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict, payload: dict, signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def refused(verifier, token) -> TokenError:
    with pytest.raises(TokenError) as e:
        verifier.verify(token)
    return e.value


# -- success ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key_name, alg, kid", [
    ("rsa", "RS256", "rsa-1"), ("rsa", "PS256", "rsa-1"), ("ec", "ES256", "ec-1"), ("ed", "EdDSA", "ed-1")])
def test_valid_tokens_return_claims(verifier, keys, key_name, alg, kid):
    got = verifier.verify(sign(keys[key_name], alg, kid, team="data"))
    assert got["sub"] == "etl-job" and got["team"] == "data" and got["iss"] == ISS


def test_bytes_token_and_audience_list(jwks_file, keys, clock):
    v = TokenVerifier(ISS, ["other", AUD], jwks_file, clock=clock.time, monotonic=clock.monotonic)
    assert v.verify(sign(keys["ec"], "ES256", "ec-1").encode())["aud"] == AUD


# -- time claims --------------------------------------------------------------------------------
def test_expired(verifier, keys):
    e = refused(verifier, sign(keys["rsa"], exp=NOW - 120))
    assert e.code == "expired" and "expired 120 s ago" in e.reason


def test_expiry_leeway(verifier, keys):
    assert verifier.verify(sign(keys["rsa"], exp=NOW - 20))["sub"] == "etl-job"   # within 30 s leeway


def test_not_yet_valid_nbf(verifier, keys):
    e = refused(verifier, sign(keys["rsa"], nbf=NOW + 300))
    assert e.code == "not_yet_valid" and "nbf" in e.reason


def test_issued_in_the_future(verifier, keys):
    e = refused(verifier, sign(keys["rsa"], iat=NOW + 300))
    assert e.code == "not_yet_valid"


def test_non_numeric_exp(verifier, keys):
    e = refused(verifier, sign(keys["rsa"], exp="tomorrow"))
    assert e.code == "malformed" and "exp" in e.reason


# -- issuer, audience, required claims ----------------------------------------------------------
def test_wrong_issuer(verifier, keys):
    e = refused(verifier, sign(keys["rsa"], iss="https://evil.test"))
    assert e.code == "wrong_issuer" and ISS in e.reason


def test_wrong_audience(verifier, keys):
    e = refused(verifier, sign(keys["rsa"], aud="billing-db"))
    assert e.code == "wrong_audience" and AUD in e.reason


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "iss", "aud"])
def test_missing_required_claim(verifier, keys, claim):
    e = refused(verifier, sign(keys["rsa"], **{claim: None}))
    assert e.code == "missing_claim" and claim in e.reason


# -- algorithm attacks --------------------------------------------------------------------------
def test_alg_none(verifier):
    e = refused(verifier, raw_token({"alg": "none", "typ": "JWT"}, claims()))
    assert e.code == "alg_none"
    e = refused(verifier, raw_token({"alg": "NoNe", "kid": "rsa-1"}, claims()))
    assert e.code == "alg_none"


def test_hs256_signed_with_the_public_key(verifier, keys):
    # the classic confusion: HMAC keyed with the RSA public key (as PEM and as the JWKS would serve it)
    pem = keys["rsa"].public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
        header = {"alg": alg, "typ": "JWT", "kid": "rsa-1"}
        unsigned = raw_token(header, claims()).rsplit(".", 1)[0]
        sig = hmac.new(pem, unsigned.encode(), digest).digest()
        e = refused(verifier, f"{unsigned}.{b64(sig)}")
        assert e.code == "alg_hmac" and alg in e.reason


def test_hmac_never_configurable(jwks_file):
    with pytest.raises(ValueError, match="never accepted"):
        TokenVerifier(ISS, AUD, jwks_file, algorithms=("RS256", "HS256"))
    with pytest.raises(ValueError):
        TokenVerifier(ISS, AUD, jwks_file, algorithms=("none",))


def test_symmetric_jwks_keys_are_ignored(tmp_path, clock, keys):
    path = tmp_path / "jwks.json"
    secret = b"shared-secret-0123456789abcdef!!"
    write_jwks(path, [{"kty": "oct", "kid": "h", "k": b64(secret)}, _jwk(keys["ec"].public_key(), "ec-1")])
    v = TokenVerifier(ISS, AUD, str(path), clock=clock.time, monotonic=clock.monotonic)
    assert refused(v, jwt.encode(claims(), secret, algorithm="HS256", headers={"kid": "h"})).code == "alg_hmac"
    # even an asymmetric alg cannot reach the oct key
    assert refused(v, sign(keys["ec"], "ES256", "h")).code == "unknown_kid"


def test_alg_outside_allow_list(jwks_file, keys, clock):
    v = TokenVerifier(ISS, AUD, jwks_file, algorithms=("ES256",), clock=clock.time, monotonic=clock.monotonic)
    e = refused(v, sign(keys["rsa"], "RS256", "rsa-1"))
    assert e.code == "alg_not_allowed" and "RS256" in e.reason
    default = TokenVerifier(ISS, AUD, jwks_file, clock=clock.time, monotonic=clock.monotonic)
    assert refused(default, sign(keys["rsa"], "RS384", "rsa-1")).code == "alg_not_allowed"


def test_key_type_must_fit_alg(verifier, keys):
    # an ES256 token naming the RSA key's kid: refused before any signature check
    e = refused(verifier, sign(keys["ec"], "ES256", "rsa-1"))
    assert e.code == "key_mismatch"


def test_jwk_alg_pins_the_algorithm(tmp_path, keys, clock):
    path = tmp_path / "jwks.json"
    write_jwks(path, [_jwk(keys["rsa"].public_key(), "rsa-1", alg="PS256")])
    v = TokenVerifier(ISS, AUD, str(path), clock=clock.time, monotonic=clock.monotonic)
    assert v.verify(sign(keys["rsa"], "PS256", "rsa-1"))["sub"] == "etl-job"
    assert refused(v, sign(keys["rsa"], "RS256", "rsa-1")).code == "key_mismatch"


def test_critical_header_refused(verifier, keys):
    token = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1", "crit": ["exp"]})
    assert refused(verifier, token).code == "malformed"


# -- signatures and malformed input -------------------------------------------------------------
def test_bad_signature_other_key_same_kid(verifier, keys):
    e = refused(verifier, sign(keys["rsa_other"], "RS256", "rsa-1"))
    assert e.code == "bad_signature"


def test_tampered_payload(verifier, keys):
    h, _p, s = sign(keys["ed"], "EdDSA", "ed-1").split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    assert refused(verifier, f"{h}.{forged}.{s}").code == "bad_signature"


@pytest.mark.parametrize("token", ["", "not-a-token", "a.b", "a.b.c", "####.####.####",
                                   b64(b"[1,2]") + "." + b64(b"{}") + ".", "x" * 20000, "\u00e9.a.b"])
def test_malformed(verifier, token):
    assert refused(verifier, token).code == "malformed"


def test_payload_not_an_object(verifier, keys):
    # correctly signed, but the payload is a JSON array
    token = jwt.api_jws.PyJWS().encode(b"[1]", keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    assert refused(verifier, token).code == "malformed"


# -- kid handling, rotation and refresh ----------------------------------------------------------
def test_unknown_kid_forces_one_rate_limited_refresh(verifier, keys, clock):
    verifier.verify(sign(keys["rsa"]))
    loads = verifier.source.loads
    e = refused(verifier, sign(keys["rsa"], kid="nope"))
    assert e.code == "unknown_kid" and "nope" in e.reason
    assert verifier.source.loads == loads + 1          # one forced re-read
    refused(verifier, sign(keys["rsa"], kid="nope-2"))
    assert verifier.source.loads == loads + 1          # rate limited: no re-read
    clock.mono += 11
    refused(verifier, sign(keys["rsa"], kid="nope-3"))
    assert verifier.source.loads == loads + 2


def test_rotation_new_kid_picked_up_at_once(verifier, jwks_file, keys):
    assert verifier.verify(sign(keys["rsa"]))["sub"] == "etl-job"
    new_key = ec.generate_private_key(ec.SECP256R1())
    write_jwks(jwks_file, [_jwk(new_key.public_key(), "ec-2")])
    assert verifier.verify(sign(new_key, "ES256", "ec-2"))["sub"] == "etl-job"


def test_periodic_refresh_drops_removed_keys(verifier, jwks_file, keys, clock):
    assert verifier.verify(sign(keys["rsa"]))
    write_jwks(jwks_file, [_jwk(keys["ec"].public_key(), "ec-1")])
    assert verifier.verify(sign(keys["rsa"]))       # before refresh_s: cached keys still serve
    clock.mono += 301
    # refresh due: rsa-1 is gone; the forced refresh is allowed too but the file no longer has it
    assert refused(verifier, sign(keys["rsa"])).code == "unknown_kid"


def test_unchanged_file_not_reread(verifier, keys, clock):
    verifier.verify(sign(keys["rsa"]))
    loads = verifier.source.loads
    clock.mono += 301
    verifier.verify(sign(keys["rsa"]))
    assert verifier.source.loads == loads


def test_keys_without_kid(tmp_path, keys, clock):
    path = tmp_path / "jwks.json"
    write_jwks(path, [_jwk(keys["rsa"].public_key()), _jwk(keys["ed"].public_key())])
    v = TokenVerifier(ISS, AUD, str(path), clock=clock.time, monotonic=clock.monotonic)
    assert v.verify(sign(keys["rsa"], kid=None))["sub"] == "etl-job"        # tried against fitting keys
    assert v.verify(sign(keys["ed"], "EdDSA", kid=None))["sub"] == "etl-job"
    assert refused(v, sign(keys["rsa_other"], kid=None)).code == "bad_signature"
    assert refused(v, sign(keys["ec"], "ES256", kid=None)).code == "unknown_kid"   # no EC key at all
    assert refused(v, sign(keys["rsa"], kid="rsa-1")).code == "unknown_kid"        # a named kid must match


def test_jwks_unavailable_and_last_good_kept(tmp_path, keys, clock):
    missing = TokenVerifier(ISS, AUD, str(tmp_path / "absent.json"), clock=clock.time, monotonic=clock.monotonic)
    e = refused(missing, sign(keys["rsa"]))
    assert e.code == "jwks_unavailable" and "absent.json" in e.reason
    path = tmp_path / "jwks.json"
    write_jwks(path, [_jwk(keys["rsa"].public_key(), "rsa-1")])
    v = TokenVerifier(ISS, AUD, str(path), clock=clock.time, monotonic=clock.monotonic)
    assert v.verify(sign(keys["rsa"]))
    path.write_text("{ broken")
    clock.mono += 301
    assert v.verify(sign(keys["rsa"]))["sub"] == "etl-job"   # a broken update keeps the previous keys


def test_jwks_from_loopback_url(keys, clock):
    body = json.dumps({"keys": [_jwk(keys["ed"].public_key(), "ed-1")]}).encode()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
        v = TokenVerifier(ISS, AUD, url, clock=clock.time, monotonic=clock.monotonic)
        assert v.verify(sign(keys["ed"], "EdDSA", "ed-1"))["sub"] == "etl-job"
        assert v.verify(sign(keys["ed"], "EdDSA", "ed-1"))
        assert len(hits) == 1                        # cached until refresh_s
        clock.mono += 301
        v.verify(sign(keys["ed"], "EdDSA", "ed-1"))
        assert len(hits) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_plain_http_jwks_only_on_loopback():
    with pytest.raises(JWKSError, match="https"):
        TokenVerifier(ISS, AUD, "http://issuer.example/jwks.json")
    with pytest.raises(JWKSError):
        TokenVerifier(ISS, AUD, "ftp://issuer.example/jwks.json")
