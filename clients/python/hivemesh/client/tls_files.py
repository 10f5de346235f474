"""The PEM files of TLS, shared by the services' servers and the client's
channels: checks that they can be used (:func:`check_tls_files`), and
:class:`FileStamps`, which tells when they change, so that a renewed
certificate is taken without a restart."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path


def _pem(path: Path, what: str, marker: str) -> None:
    """ValueError unless ``path`` can be read and holds a PEM ``marker``
    block (only the path goes into the message, never the contents)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in text or marker.encode() not in text:
        raise ValueError(f"{path} holds no PEM {what}")
    if b"ENCRYPTED" in text and what == "private key":
        raise ValueError(f"{path} is an encrypted private key; give it unencrypted "
                         "(protect the file instead, as a mounted Secret)")


def check_certificate_file(path: Path) -> Path:
    _pem(path, "certificate", "CERTIFICATE-----")
    return path


def check_ca_file(path: Path) -> Path:
    """A CA bundle: PEM certificates that parse (gRPC cannot use one that
    does not, and would only say so at bind or at every handshake)."""
    _pem(path, "certificate", "CERTIFICATE-----")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ValueError(f"{path} holds a malformed PEM certificate") from None
    return path


def check_key_file(path: Path) -> Path:
    _pem(path, "private key", "PRIVATE KEY-----")
    return path


def check_key_pair(cert_file: Path, key_file: Path) -> None:
    """ValueError unless the key is the certificate's (each file checked
    on its own before)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def no_password() -> bytes:
        raise ValueError("encrypted")
    try:
        context.load_cert_chain(cert_file, key_file, password=no_password)
    except (ssl.SSLError, ValueError):
        raise ValueError(f"the private key {key_file} is not the key of the certificate "
                         f"{cert_file} (or one of them is malformed)") from None


def check_tls_files(cert_file: Path, key_file: Path, ca_file: Path | None) -> None:
    """ValueError unless the certificate, its key and the CA bundle (if
    any) form a usable set: each holds what it should and the key is the
    certificate's."""
    check_certificate_file(cert_file)
    check_key_file(key_file)
    check_key_pair(cert_file, key_file)
    if ca_file is not None:
        check_ca_file(ca_file)


class FileStamps:
    """Tells when a set of files changed: a file's stamp is its modification
    time, size and inode (a Kubernetes Secret's files are swapped for new
    ones, a symlink moved, rather than written in place)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = tuple(paths)
        self._seen = self._stamp()

    def _stamp(self) -> tuple | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino)
                         for s in (p.stat() for p in self.paths))
        except OSError:
            return None

    def changed(self) -> bool:
        """Whether the files changed since the last time this said so (or
        since they were first seen); False while one of them is missing,
        so that the change is told once they are all there."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        return True
