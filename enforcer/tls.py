"""The agent's local certificate authority: terminates workload TLS on the enforcer's listener.

A workload that asks for TLS (Postgres `sslmode=require`, HTTPS) talks to the enforcer, which
re-originates TLS upstream. The enforcer presents a leaf certificate issued here for the
target's own hostnames and IPs, so a client that verifies (`sslmode=verify-full
sslrootcert=<ca.crt>`) accepts it once the agent's CA is trusted.

Keys are ECDSA P-256: Ed25519 certificates are still refused by many TLS clients. The CA key
lives in `<state_dir>/ca.key` (mode 0600), the certificate in `<state_dir>/ca.crt` (the file
to distribute to workloads). Leaves are issued on first use per SAN set, cached in memory and
under `<state_dir>/leaves/`, and re-issued before they expire.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import threading
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
LEAF_DIR = "leaves"
CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 90
RENEW_BEFORE = datetime.timedelta(days=7)      # re-issue a leaf this long before it expires
ALPN_PROTOCOLS = ["postgresql", "http/1.1"]     # PG17 direct SSL requires ALPN "postgresql"


class LocalCAError(Exception):
    """The CA files exist but cannot be used; the message names the file and the fix."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: str, data: bytes) -> None:
    """Write a file readable by its owner only, atomically (no window with wider permissions)."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class LocalCA:
    """Load with `LocalCA.load_or_create(state_dir)`; then `server_context_for(hostnames, ips)`."""

    def __init__(self, state_dir: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.state_dir = state_dir
        self.key = key
        self.cert = cert
        self._lock = threading.Lock()
        self._contexts: dict[tuple, tuple[ssl.SSLContext, datetime.datetime]] = {}

    # -- the CA ----------------------------------------------------------------------------
    @property
    def cert_path(self) -> str:
        return os.path.join(self.state_dir, CA_CERT_FILE)

    @property
    def key_path(self) -> str:
        return os.path.join(self.state_dir, CA_KEY_FILE)

    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @classmethod
    def load_or_create(cls, state_dir: str, common_name: Optional[str] = None) -> "LocalCA":
        """The CA under `state_dir`, generated at first start (ECDSA P-256, 10 years)."""
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        key_path = os.path.join(state_dir, CA_KEY_FILE)
        cert_path = os.path.join(state_dir, CA_CERT_FILE)
        if os.path.exists(key_path) or os.path.exists(cert_path):
            return cls._load(state_dir, key_path, cert_path)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Warden"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"Warden local CA {os.uname().nodename}"[:64]),
        ])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .sign(key, hashes.SHA256()))
        # key first: a crash between the writes leaves a key without certificate, reported on load
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, _cert_pem(cert))
        return cls(state_dir, key, cert)

    @classmethod
    def _load(cls, state_dir: str, key_path: str, cert_path: str) -> "LocalCA":
        for path in (key_path, cert_path):
            if not os.path.exists(path):
                raise LocalCAError(f"{path} is missing while its pair exists; restore it or remove both "
                                   f"{key_path} and {cert_path} to generate a new CA (workloads must then "
                                   f"trust the new {CA_CERT_FILE})")
        mode = os.stat(key_path).st_mode & 0o777
        if mode & 0o077:
            raise LocalCAError(f"{key_path} is readable by others (mode {mode:o}); run chmod 600 {key_path}")
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (ValueError, TypeError) as e:
            raise LocalCAError(f"cannot read the local CA from {key_path} / {cert_path}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise LocalCAError(f"{key_path} is not an ECDSA key")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise LocalCAError(f"{cert_path} does not belong to the key in {key_path}")
        return cls(state_dir, key, cert)

    # -- leaves ----------------------------------------------------------------------------
    def issue(self, hostnames: Sequence[str], ips: Sequence[str],
              valid_days: int = LEAF_VALID_DAYS) -> tuple[bytes, bytes]:
        """A server certificate for these names: (certificate chain PEM (leaf then CA), key PEM)."""
        if not hostnames and not ips:
            raise ValueError("a leaf certificate needs at least one hostname or IP address")
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cn = (list(hostnames) + list(ips))[0][:64]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(min(now + datetime.timedelta(days=valid_days), self.cert.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return _cert_pem(cert) + self.cert_pem(), _key_pem(key)

    def server_context_for(self, hostnames: Sequence[str], ips: Sequence[str]) -> ssl.SSLContext:
        """A server-side SSLContext presenting a leaf for these SANs (issued once, then cached)."""
        names = tuple(sorted(set(hostnames)))
        addrs = tuple(sorted({str(ipaddress.ip_address(ip)) for ip in ips}))
        key = (names, addrs)
        with self._lock:
            entry = self._contexts.get(key)
            if entry is not None and entry[1] - RENEW_BEFORE > _now():
                return entry[0]
            chain_path, key_path, expires = self._leaf_files(names, addrs)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(chain_path, key_path)
            ctx.set_alpn_protocols(ALPN_PROTOCOLS)
            self._contexts[key] = (ctx, expires)
            return ctx

    def _leaf_files(self, names: tuple, addrs: tuple) -> tuple[str, str, datetime.datetime]:
        """Reuse the stored leaf for this SAN set while it is valid, otherwise issue a new one
        (ssl.SSLContext loads certificates from files only)."""
        leaf_dir = os.path.join(self.state_dir, LEAF_DIR)
        os.makedirs(leaf_dir, mode=0o700, exist_ok=True)
        tag = hashlib.sha256(repr((names, addrs)).encode()).hexdigest()[:24]
        chain_path = os.path.join(leaf_dir, f"{tag}.crt")
        key_path = os.path.join(leaf_dir, f"{tag}.key")
        try:
            with open(chain_path, "rb") as f:
                leaf = x509.load_pem_x509_certificate(f.read())
            fresh = (leaf.not_valid_after_utc - RENEW_BEFORE > _now() and os.path.exists(key_path)
                     and leaf.issuer == self.cert.subject)
            if fresh:
                # issued by this CA's key (not a previous CA with the same name)
                self.cert.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes,
                                              ec.ECDSA(leaf.signature_hash_algorithm))
                return chain_path, key_path, leaf.not_valid_after_utc
        except Exception:     # noqa: BLE001 - a missing, foreign or damaged stored leaf: issue anew
            pass
        chain, key = self.issue(names, addrs)
        _write_private(key_path, key)
        _write_public(chain_path, chain)
        leaf = x509.load_pem_x509_certificate(chain)
        return chain_path, key_path, leaf.not_valid_after_utc
