"""The client TLS context of a destination's `tls` section (DICOM TLS, MLLP over TLS)."""

from __future__ import annotations

import ssl


def tls_client_context(tls: object | None) -> ssl.SSLContext | None:
    """Client SSL context from a destination's `tls` config section (None when TLS is off)."""
    if tls is None or not getattr(tls, "enabled", False):
        return None
    ca = getattr(tls, "ca_certificates", None)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    cert, key = getattr(tls, "certificate", None), getattr(tls, "private_key", None)
    if cert and key:
        context.load_cert_chain(str(cert), str(key))
    return context
