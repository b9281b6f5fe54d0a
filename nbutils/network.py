"""Whether a download host answers, so that an offline run fails fast naming the offline choice."""

import socket


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` accepts a connection within ``timeout`` seconds (fails fast offline)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
