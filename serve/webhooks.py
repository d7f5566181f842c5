"""Job webhooks (docs/http-api.md, Webhooks): a job's status POSTed to the URL its request gave, signed as Standard
Webhooks (webhook-id, webhook-timestamp, webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">), retried
with backoff; only to hosts the server allows, so a client cannot make the server call anything else."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import get_args
from urllib.parse import urlsplit

import aiohttp

from serve.schemas import WebhookEvent

EVENTS: tuple[str, ...] = get_args(WebhookEvent)
SECRET_PREFIX = "whsec_"
PROGRESS_EVERY_S = 2.0  # progress deliveries at most this often
ATTEMPTS = 5  # a delivery is tried this many times (non-2xx or no answer within TIMEOUT_S)
TIMEOUT_S = 5.0
BACKOFF_S = 0.5  # before attempt k+1: BACKOFF_S * 2**k seconds
logger = logging.getLogger(__name__)


def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (whsec_ + base64); ValueError naming webhook_secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"webhook_secret: must start with {SECRET_PREFIX} followed by base64")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError(f"webhook_secret: the part after {SECRET_PREFIX} is not base64") from None
    if len(key) < 24:
        raise ValueError(f"webhook_secret: the key must be at least 24 bytes, got {len(key)}")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: v1, then the base64 HMAC-SHA256 of "id.timestamp.body"."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def allowed_hosts(setting: str | Sequence[str] | None) -> list[str]:
    """The allowed hosts of the setting: a list, or a comma-separated string (DIFFPANO_WEBHOOK_ALLOW)."""
    items = setting.split(",") if isinstance(setting, str) else setting or []
    return [h.strip().lower() for h in items if h.strip()]


def url_problem(url: str, allow: list[str]) -> str | None:
    """Why the server will not call url (http or https, to an allowed host or host:port), or None."""
    if not allow:
        return "the server allows no webhook hosts: set webhook_allow (or DIFFPANO_WEBHOOK_ALLOW)"
    try:
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "must not carry credentials"
    if host not in allow and f"{host}:{port}" not in allow:
        return f"host {host!r} is not in the server's webhook_allow"
    return None


class Webhook:
    """Deliveries of one job's events to one URL, in order, each retried up to ATTEMPTS times."""

    def __init__(self, url: str, events: Sequence[str], key: bytes) -> None:
        self.url, self.events, self.key = url, set(events), key
        self.failures = 0  # attempts that got no 2xx (what the job's status reports)
        self.last_progress = 0.0

    def wants_progress(self) -> bool:
        """Whether a progress event is due (wanted, and none sent in the last PROGRESS_EVERY_S)."""
        return "progress" in self.events and time.monotonic() - self.last_progress >= PROGRESS_EVERY_S

    async def send(self, event: WebhookEvent, data: dict) -> bool:
        """POST the event if it is wanted; whether it was delivered (or not wanted)."""
        if event not in self.events:
            return True
        if event == "progress":
            self.last_progress = time.monotonic()
        msg_id = f"msg_{uuid.uuid4().hex}"  # the same on every attempt: receivers drop repeats by it
        body = json.dumps({"type": f"job.{event}", "timestamp": time.time(), "data": data}).encode()
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            if await self._post(msg_id, body):
                return True
            self.failures += 1
        logger.warning("webhook: %s of %s not delivered to %s after %d attempts", event, data.get("job_id"),
                       self.url, ATTEMPTS)
        return False

    async def _post(self, msg_id: str, body: bytes) -> bool:
        """One attempt: whether the receiver answered 2xx within TIMEOUT_S (redirects are not followed)."""
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": signature(self.key, msg_id, timestamp, body)}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session, \
                    session.post(self.url, data=body, headers=headers, allow_redirects=False) as response:
                return 200 <= response.status < 300
        except Exception:  # noqa: BLE001 - any failure to deliver is a failed attempt, retried, never fatal
            return False
