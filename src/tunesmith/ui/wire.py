"""What the dashboard's server reads of a request, as plain functions: Host names, media types,
JSON bodies; and what it writes (finite numbers only)."""
from __future__ import annotations

import ipaddress
import json
import math
import socket

from ..errors import UserError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def own_names(host: str) -> set[str]:
    """The Host names a server bound to `host` answers to besides IP addresses: a name no one
    outside chose, so a page whose domain an attacker re-points at this machine (DNS rebinding) is refused."""
    names = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    return names | ({host.lower()} if host and not is_address(host) else set())


def media_type(value: str | None) -> str:
    """The MIME type of a Content-Type value, parameters left off: 'text/plain; x=application/json' -> 'text/plain'."""
    return (value or "").split(";", 1)[0].strip().lower()


def json_object(body: bytes) -> dict:
    try:
        value = json.loads(body or b"{}")
    except (ValueError, RecursionError) as err:
        raise UserError(f"request body: not valid JSON ({str(err)[:120] or type(err).__name__})") from None
    if not isinstance(value, dict):
        raise UserError("request body: expected a JSON object")
    return value


def finite(value):
    """NaN and infinity (a skipped step's loss) become null: browsers' JSON.parse rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
