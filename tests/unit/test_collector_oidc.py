"""People's tokens from an external OIDC provider, against a JWKS generated here."""
import base64
import hashlib
import hmac
import json
import time
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

warnings.filterwarnings("ignore", category=DeprecationWarning)
from fastapi.testclient import TestClient  # noqa: E402

from collector.app import create_app  # noqa: E402
from collector.auth import mint_api_token  # noqa: E402
from collector.config import ConfigError, load_config  # noqa: E402

ISSUER, AUDIENCE = "https://idp.example.test/realms/sec", "warden-collector-api"


def _jwk(public_key, kid: str, alg: str) -> dict:
    entry = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(public_key))
    entry.update(kid=kid, alg=alg, use="sig")
    return entry


@pytest.fixture
def idp(tmp_path):
    keys = {"rsa-1": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
            "ec-1": (ec.generate_private_key(ec.SECP256R1()), "ES256")}
    jwks = tmp_path / "jwks.json"

    def publish():
        jwks.write_text(json.dumps({"keys": [_jwk(k.public_key(), kid, alg) for kid, (k, alg) in keys.items()]}))
    publish()

    def token(groups=("sec-auditors",), kid="rsa-1", ttl=600, **overrides):
        key, alg = keys[kid]
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u-123", "email": "erin@example.test",
                  "groups": groups if isinstance(groups, str) else list(groups), "iat": now, "exp": now + ttl, **overrides}
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})

    config_path = tmp_path / "collector.yaml"
    config_path.write_text(
        f"db: sqlite:///{tmp_path}/c.db\nstate_dir: {tmp_path / 'state'}\n"
        f"tokens:\n  oidc:\n    issuer: {ISSUER}\n    audience: {AUDIENCE}\n    jwks: {jwks}\n"
        f"    role_claim: groups\n    subject_claim: email\n    role_map:\n      sec-auditors: auditor\n"
        f"      sec-approvers: approver\n      sec-admins: admin\n")
    config = load_config(config_path)
    app = create_app(config)
    client = TestClient(app)

    class IdP:
        pass
    i = IdP()
    i.keys, i.publish, i.token, i.client, i.app, i.config = keys, publish, token, client, app, config
    yield i
    client.close()
    app.state.store.dispose()


def _b64(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _get(idp, token, path="/v1/sessions"):
    return idp.client.get(path, headers={"Authorization": f"Bearer {token}"})


def test_groups_map_to_roles_and_reads_are_logged(idp):
    assert _get(idp, idp.token()).status_code == 200
    assert _get(idp, idp.token(kid="ec-1")).status_code == 200  # ES256 key of the same JWKS
    assert _get(idp, idp.token(), "/v1/access-log").status_code == 403  # auditor is not admin
    # The highest mapped role wins; unknown groups are ignored.
    admin = idp.token(groups=["sec-auditors", "sec-admins", "marketing"])
    log = _get(idp, admin, "/v1/access-log").json()["items"]
    assert {(r["subject"], r["role"]) for r in log} >= {("erin@example.test", "auditor"),
                                                         ("erin@example.test", "admin")}
    # A single string claim works too.
    assert _get(idp, idp.token(groups="sec-approvers")).status_code == 200


def test_no_mapped_group_is_forbidden(idp):
    answer = _get(idp, idp.token(groups=["marketing"]))
    assert answer.status_code == 403 and "no Warden role" in answer.json()["detail"]


@pytest.mark.parametrize("case, expected", [
    ("expired", "expired"),
    ("wrong_audience", "wrong audience"),
    ("unknown_kid", "unknown signing key id"),
    ("forged", "bad signature"),
    ("hs256", "HMAC-signed token"),
    ("none", "alg: none"),
    ("no_exp", "missing required claim"),
])
def test_refused_tokens(idp, case, expected):
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u", "email": "x@example.test", "groups": ["sec-admins"],
              "iat": now, "exp": now + 600}
    if case == "expired":
        token = idp.token(ttl=-3600, iat=now - 7200)
    elif case == "wrong_audience":
        token = idp.token(aud="another-api")
    elif case == "unknown_kid":
        token = jwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                           headers={"kid": "rsa-unknown"})
    elif case == "forged":  # right kid, another key
        token = jwt.encode(claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
                           headers={"kid": "rsa-1"})
    elif case == "hs256":  # key confusion: the public key's PEM as an HMAC secret (built by hand: PyJWT refuses)
        pem = idp.keys["rsa-1"][0].public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = (_b64({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}) + "." + _b64(claims)).encode()
        mac = base64.urlsafe_b64encode(hmac.new(pem, signing_input, hashlib.sha256).digest()).rstrip(b"=")
        token = (signing_input + b"." + mac).decode()
    elif case == "none":
        token = jwt.encode(claims, None, algorithm="none")
    else:
        del claims["exp"]
        token = jwt.encode(claims, idp.keys["rsa-1"][0], algorithm="RS256", headers={"kid": "rsa-1"})
    answer = _get(idp, token)
    assert answer.status_code == 401, answer.text
    assert expected in answer.json()["detail"]


def test_rotated_key_is_picked_up_by_kid(idp):
    assert _get(idp, idp.token()).status_code == 200  # JWKS loaded
    idp.keys["rsa-2"] = (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    idp.publish()
    assert _get(idp, idp.token(kid="rsa-2")).status_code == 200  # unknown kid -> one refresh -> found


def test_local_tokens_still_work_next_to_oidc(idp):
    app = idp.app
    with app.state.store.write() as c:
        token = mint_api_token(c, app.state.keys, role="auditor", subject="local", ttl_s=60,
                               issuer=idp.config.tokens.issuer, audience=idp.config.tokens.audience)
    assert _get(idp, token).status_code == 200


@pytest.mark.parametrize("oidc, message", [
    ("    issuer: i\n    audience: a\n    jwks: /j\n    role_map:\n      g: root\n", "unknown role 'root'"),
    ("    issuer: i\n    audience: a\n    role_map:\n      g: auditor\n", "tokens.oidc needs jwks"),
    ("    issuer: i\n    audience: a\n    jwks: /j\n", "role_map is empty"),
    ("    issuer: i\n    audience: a\n    jwks: /j\n    algorithms: [HS256]\n    role_map:\n      g: admin\n",
     "HS256 not allowed"),
    ("    issuer: i\n    audience: a\n    jwks: http://idp.example.test/jwks\n    role_map:\n      g: admin\n",
     "https URL"),
    ("    issuer: warden-collector\n    audience: a\n    jwks: /j\n    role_map:\n      g: admin\n",
     "must differ from tokens.issuer"),
])
def test_oidc_config_errors(tmp_path, oidc, message):
    path = tmp_path / "collector.yaml"
    path.write_text("tokens:\n  oidc:\n" + oidc)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
