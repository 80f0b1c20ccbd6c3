"""The listener's TLS: the server certificate, its key and (mutual TLS) the client CA, from
PEM files that are re-read when they change.

    files = CertificateFiles(Path("tls.crt"), Path("tls.key"), client_ca=Path("clients-ca.crt"))
    credentials = files.server_credentials()     # ConfigError naming the file when unusable
    server.add_secure_port("0.0.0.0:50051", credentials)

Rotation without a restart: grpc calls `CertificateFiles.fetch` before the handshake of
every new connection (grpc's dynamic_ssl_server_credentials; it works with grpc.aio, on a
grpc core thread, not the event loop). `fetch` reads the two or three files (tens of
microseconds, once per connection, not per call) and compares their bytes with what it
loaded last: bytes, not modification times, which a quick second write can leave
unchanged. It returns the new configuration only when they changed and form a usable
pair; otherwise None, which keeps the current one. Connections already open keep the
certificate they were made with.

A rotation writes two files, so a handshake may see the new certificate with the old key:
that pair is refused (logged once per change, the previous certificate stays) and taken as
soon as the key follows. Files that change while they are checked are read again at the
next handshake. A cert-manager or Kubernetes Secret volume (an atomic symlink swap) and a
plain `cp` of both files both work.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

import grpc

from featurestore.config import SecuritySettings
from featurestore.errors import ConfigError

__all__ = ["CertificateFiles", "server_credentials"]

log = logging.getLogger(__name__)


class CertificateFiles:
    """The server's certificate chain and key and, for mutual TLS, the CA of its clients.

    Parameters:
        cert: the certificate chain (PEM): the server's certificate first.
        key: its private key (PEM, not encrypted).
        client_ca: CA certificates (PEM); when given, every client must present a
            certificate one of them signed (mutual TLS).

    Example:
        files = CertificateFiles(Path("tls.crt"), Path("tls.key"))
        server.add_secure_port("0.0.0.0:50051", files.server_credentials())
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()  # grpc may run fetchers of parallel handshakes at once
        self._seen: tuple[bytes | None, ...] = ()  # the files' bytes when last loaded or refused
        self._refused: str | None = None  # the last refusal logged
        self.loads = 0  # configurations handed to grpc (the first one included), for tests and logs

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for `add_secure_port` that follow the files; ConfigError when they are unusable now."""
        contents = self._read()
        configuration = self._configure(contents)
        self._seen = contents
        self.loads += 1
        return grpc.dynamic_ssl_server_credentials(
            configuration,
            self.fetch,
            require_client_authentication=self.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate fetcher: the new configuration when the files changed and are usable, else None.

        Never raises (it runs inside grpc's handshake): a failure is logged once per change
        of the files and the current certificate stays.
        """
        with self._lock:
            try:
                contents = self._read()
            except ConfigError as exc:  # mid-rotation, or gone: the current certificate stays
                self._refuse(str(exc), None)
                return None
            if contents == self._seen:
                return None
            try:
                configuration = self._configure(contents)
            except ConfigError as exc:
                self._refuse(str(exc), contents)
                return None
            if self._read_or_none() != contents:
                return None  # changed while checked: read again at the next handshake
            self._seen, self._refused = contents, None
            self.loads += 1
            log.info("TLS certificate files changed: new connections use the certificate in %s", self.cert)
            return configuration

    def _refuse(self, why: str, contents: tuple[bytes | None, ...] | None) -> None:
        """Keep the current certificate; log `why` once, not per handshake."""
        if contents is not None and self._read_or_none() == contents:
            self._seen = contents  # a broken pair that stays: not checked again until it changes
        if why != self._refused:
            self._refused = why
            log.warning("keeping the current TLS certificate: %s", why)

    def _read_or_none(self) -> tuple[bytes | None, ...] | None:
        try:
            return self._read()
        except ConfigError:
            return None

    def _read(self) -> tuple[bytes | None, ...]:
        """The bytes of the certificate, the key and the client CA (None without one); ConfigError naming a file."""
        try:
            return tuple(None if path is None else path.read_bytes() for path in (self.cert, self.key, self.client_ca))
        except OSError as exc:
            raise ConfigError(f"TLS file {str(exc.filename)!r} cannot be read: {exc.strerror}") from None

    def _configure(self, contents: tuple[bytes | None, ...]) -> grpc.ServerCertificateConfiguration:
        """`contents` as a grpc configuration, checked by OpenSSL first (the pair on the files themselves)."""
        cert, key, client_ca = contents
        assert cert is not None and key is not None
        _check_pair(self.cert, self.key)
        if client_ca is not None:
            _check_ca(self.client_ca, client_ca)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)


def _no_password() -> str:
    raise ConfigError("the TLS key is encrypted: give an unencrypted PEM key (grpc cannot ask for a password)")


def _check_pair(cert: Path, key: Path) -> None:
    """ConfigError unless `cert` holds a PEM certificate chain whose first certificate `key` is the key of."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"TLS certificate {str(cert)!r} and key {str(key)!r} are not a usable PEM pair ({exc.reason or exc})"
        ) from None


def _check_ca(path: Path | None, pem: bytes) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"TLS client CA {str(path)!r} holds no usable PEM certificate ({exc})") from None


def server_credentials(settings: SecuritySettings) -> tuple[grpc.ServerCredentials, CertificateFiles] | None:
    """The listener's credentials and the files they follow, or None when TLS is off.

    Raises ConfigError, naming the file, when a file is missing, unreadable or not a
    usable PEM certificate, key or CA.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return files.server_credentials(), files
