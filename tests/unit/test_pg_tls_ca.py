"""The agent's local CA (enforcer/tls.py): files, leaves, caching, and real in-memory TLS handshakes."""
import os
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from enforcer.tls import LocalCA, LocalCAError


def handshake(server_ctx, cafile, server_hostname, alpn=None):
    """Run a TLS handshake between two SSLObjects over memory BIOs; returns (client, server) objects."""
    client_ctx = ssl.create_default_context(cafile=cafile)
    if alpn:
        client_ctx.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client, server
    raise AssertionError("handshake did not finish")


def test_ca_files_and_key_type(tmp_path):
    ca = LocalCA.load_or_create(str(tmp_path / "ca"))
    assert os.stat(ca.key_path).st_mode & 0o777 == 0o600
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    again = LocalCA.load_or_create(str(tmp_path / "ca"))
    assert again.cert == ca.cert


def test_leaf_sans_cache_and_reuse_after_restart(tmp_path):
    ca = LocalCA.load_or_create(str(tmp_path / "ca"))
    ctx = ca.server_context_for(["db.internal", "db.example"], ["127.0.0.2"])
    assert ca.server_context_for(["db.example", "db.internal"], ["127.0.0.2"]) is ctx
    chain, _key = ca.issue(["db.example"], ["::1"])
    leaf = x509.load_pem_x509_certificate(chain)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["::1"]
    stored = sorted(os.listdir(tmp_path / "ca" / "leaves"))
    assert len(stored) == 2 and os.stat(tmp_path / "ca" / "leaves" / stored[1]).st_mode & 0o777 == 0o600
    before = (tmp_path / "ca" / "leaves" / stored[0]).read_bytes()
    LocalCA.load_or_create(str(tmp_path / "ca")).server_context_for(["db.example", "db.internal"], ["127.0.0.2"])
    assert (tmp_path / "ca" / "leaves" / stored[0]).read_bytes() == before


def test_handshake_verifies_names_and_offers_postgresql_alpn(tmp_path):
    ca = LocalCA.load_or_create(str(tmp_path / "ca"))
    ctx = ca.server_context_for(["db.example"], ["127.0.0.1"])
    client, server = handshake(ctx, ca.cert_path, "db.example", alpn=["postgresql"])
    assert client.selected_alpn_protocol() == "postgresql"
    handshake(ctx, ca.cert_path, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        handshake(ctx, ca.cert_path, "other.example")
    other = LocalCA.load_or_create(str(tmp_path / "other"))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ctx, other.cert_path, "db.example")


def test_unsafe_or_broken_ca_files_are_reported_with_their_path(tmp_path):
    ca = LocalCA.load_or_create(str(tmp_path / "ca"))
    os.chmod(ca.key_path, 0o644)
    with pytest.raises(LocalCAError, match="chmod 600 " + ca.key_path):
        LocalCA.load_or_create(str(tmp_path / "ca"))
    os.chmod(ca.key_path, 0o600)
    os.remove(ca.cert_path)
    with pytest.raises(LocalCAError, match="ca.crt is missing"):
        LocalCA.load_or_create(str(tmp_path / "ca"))
    with pytest.raises(ValueError):
        ca.issue([], [])
