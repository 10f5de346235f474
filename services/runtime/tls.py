"""The server's TLS certificate, taken again from its files when they
change, so that a renewed certificate (cert-manager, a rotated Secret)
serves new connections without a restart."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from hivemesh.client.tls_files import FileStamps, check_tls_files
from hivemesh.runtime.settings import ServerSettings

log = logging.getLogger("hivemesh.server")


class CertificateFiles:
    """The certificate, key and client CA files of a TLS server. gRPC asks
    :meth:`fetch` before each new connection's handshake: the files are
    read again only when one of them changed (its modification time, size
    or inode), and taken only once they form a usable set again (a rotation
    that has written the certificate but not yet its key is waited out;
    Kubernetes swaps a Secret's files at once)."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._stamps = FileStamps(p for p in (cert_file, key_file, client_ca_file)
                                  if p is not None)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=(None if self.client_ca_file is None
                               else self.client_ca_file.read_bytes()))

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed into a usable set,
        else None (gRPC keeps the current one). Never raises: it runs in
        gRPC's handshake path."""
        if not self._stamps.changed():
            return None
        try:
            check_tls_files(self.cert_file, self.key_file, self.client_ca_file)
            configuration = self.configuration()
        except (OSError, ValueError) as exc:
            log.warning("the TLS files changed but do not form a usable set; the current "
                        "certificate stays", extra={"problem": str(exc)})
            return None
        log.info("TLS certificate taken again from its files",
                 extra={"cert_file": str(self.cert_file)})
        return configuration


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials of the server (None: plaintext), the files read now
    and again whenever they change. With ``tls_client_ca_file`` the
    handshake requires a client certificate signed by one of its CAs."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    files = CertificateFiles(settings.tls_cert_file, settings.tls_key_file,
                             settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), files.fetch,
        require_client_authentication=settings.tls_client_ca_file is not None)
