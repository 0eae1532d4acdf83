"""DICOM over TLS (the IHE ATNA secure node profile): contexts for what we serve and send.

One configuration serves both directions: our certificate and key identify thyrocad to
its peers, and the CA, when given, is the trust anchor for theirs. A listener with a
CA requires and verifies client certificates; a client always verifies the server's
certificate chain (against the CA, or the system's trust store without one).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from thyrocad.pacs.errors import PacsError


class TlsError(PacsError):
    """A TLS configuration that cannot be used (missing or unreadable PEM files)."""


@dataclass(frozen=True)
class TlsConfig:
    """PEM files: our certificate and key, and the CA that signs the peers' certificates."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def has_identity(self) -> bool:
        return self.cert is not None and self.key is not None


def _restrict(context: ssl.SSLContext) -> ssl.SSLContext:
    # BCP 195 / PS3.15 B.9: nothing older than TLS 1.2.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load_identity(context: ssl.SSLContext, config: TlsConfig) -> None:
    try:
        context.load_cert_chain(str(config.cert), str(config.key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"cannot load the TLS certificate {config.cert} with key {config.key}: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the TLS CA file {ca}: {exc}") from exc


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """The listener's context: our identity; with a CA, client certificates are required."""
    if not config.has_identity:
        raise TlsError("a TLS listener needs both THYROCAD_TLS_CERT and THYROCAD_TLS_KEY")
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_identity(context, config)
    if config.ca is not None:
        _load_ca(context, config.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """The context of an association we open: the server's chain is always verified.

    Host names are not checked: DICOM peers are configured by address in most
    hospitals, and the CA that signs them is the hospital's own. Our certificate is
    presented when one is configured (peers that require client certificates).
    """
    context = _restrict(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    if config.ca is not None:
        _load_ca(context, config.ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if config.has_identity:
        _load_identity(context, config)
    return context
