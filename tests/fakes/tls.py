"""Throwaway certificates for the TLS tests: a CA, a server certificate
for localhost and 127.0.0.1 (and one from another CA, as after a CA
rotation), and client certificates (Pki.named_client for one with given
names), written as PEM files under the test's temporary directory (never
committed); and the Envoy sidecars' mesh certificates (make_mesh_pki)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate
    server: Pair
    client: Pair
    # Signed by another CA: a client certificate the server must refuse.
    stranger: Pair
    other_ca: Path
    ca_key: Path  # the CA's key, for named_client
    # The server's names signed by the other CA: the server re-issued under a
    # rotated CA.
    other_server: Pair

    def _signer(self):
        """(key, certificate) of the CA."""
        return (serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None),
                x509.load_pem_x509_certificate(self.ca.read_bytes()))

    def named_client(self, name: str, *, dns: Sequence[str] = (),
                     uris: Sequence[str] = ()) -> Pair:
        """A client certificate from the CA, its common name ``name``, its
        subject alt names ``dns`` and ``uris`` (a SPIFFE id is a URI)."""
        ca_key, ca_cert = self._signer()
        alt_names = ([x509.DNSName(n) for n in dns]
                     + [x509.UniformResourceIdentifier(u) for u in uris])
        key, cert = _signed(name, ca_key, ca_cert, [ExtendedKeyUsageOID.CLIENT_AUTH], alt_names)
        return _write_pair(self.ca.parent, name, key, cert)

    def peer(self, name: str) -> Pair:
        """A certificate from the CA for a server that is a client of its
        peers too (a Redis Cluster node on its cluster bus): the server's
        names, server and client auth."""
        ca_key, ca_cert = self._signer()
        key, cert = _signed(name, ca_key, ca_cert, [ExtendedKeyUsageOID.SERVER_AUTH,
                                                    ExtendedKeyUsageOID.CLIENT_AUTH],
                            _server_names())
        return _write_pair(self.ca.parent, name, key, cert)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write_pair(directory: Path, name: str, key, cert) -> Pair:
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def _ca(directory: Path, name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _signed(name: str, ca_key, ca_cert, usages: list, alt_names: list):
    """(key, certificate) of a leaf ``name`` the CA signs, valid a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _server_names() -> list:
    return [x509.DNSName("localhost"), x509.DNSName("hivemesh.test"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


def _leaf(directory: Path, name: str, ca_key, ca_cert, *, server: bool) -> Pair:
    key, cert = _signed(
        name, ca_key, ca_cert,
        [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH],
        _server_names() if server else [])
    return _write_pair(directory, name, key, cert)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_path = _ca(directory, "test-ca")
    other_key, other_cert, other_path = _ca(directory, "other-ca")
    ca_key_path = directory / "test-ca.key"
    _write_key(ca_key, ca_key_path)
    return Pki(ca=ca_path,
               server=_leaf(directory, "server", ca_key, ca_cert, server=True),
               client=_leaf(directory, "client", ca_key, ca_cert, server=False),
               stranger=_leaf(directory, "stranger", other_key, other_cert, server=False),
               other_ca=other_path, ca_key=ca_key_path,
               other_server=_leaf(directory, "other-server", other_key, other_cert, server=True))


@dataclass(frozen=True)
class MeshPki:
    """Certificates as the mesh-mtls component mounts them, one directory
    per identity holding ca.crt, tls.crt and tls.key."""

    ca: Path
    dirs: dict[str, Path]  # identity -> its directory
    # Same names, signed by another CA: refused by the mesh.
    stranger: Path


def _mesh_leaf(directory: Path, name: str, dns_name: str, ca_key, ca_cert, ca_path: Path) -> Path:
    """A certificate for both ends of a connection (an Envoy sidecar serves
    and calls with the same one), its DNS subject alt name ``dns_name``."""
    key, cert = _signed(name, ca_key, ca_cert,
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                        [x509.DNSName(dns_name)])
    out = directory / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.crt").write_bytes(ca_path.read_bytes())
    (out / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, out / "tls.key")
    return out


def make_mesh_pki(directory: Path, dns_names: dict[str, str]) -> MeshPki:
    """``dns_names``: identity -> the DNS name its certificate carries. The
    stranger has the first identity's name but another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca_path = _ca(directory, "mesh-ca")
    other_key, other_cert, other_path = _ca(directory, "other-mesh-ca")
    dirs = {name: _mesh_leaf(directory, name, dns, ca_key, ca_cert, ca_path)
            for name, dns in dns_names.items()}
    first = next(iter(dns_names.values()))
    stranger = _mesh_leaf(directory, "stranger", first, other_key, other_cert, other_path)
    return MeshPki(ca=ca_path, dirs=dirs, stranger=stranger)
