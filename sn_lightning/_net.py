"""Whether a server can be reached: one TCP connection, before a library retries for a minute."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_PROXY_KEYS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "ALL_PROXY")


def unreachable_reason(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url``'s host takes no TCP connection (``"cannot reach ..."``), or None if it does.

    Behind an HTTP(S) proxy the check is skipped (None): the proxy, not this machine, connects.
    """
    if any(os.environ.get(k) for k in _PROXY_KEYS):
        return None
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {url} ({type(err).__name__}: {err})"
