"""Image quotas per API key (docs/http-api.md, Quotas): images per minute, counted across ingress replicas through the
output root, as job records are. Each request leaves a reservation file in its key's minute; reading them in the
order they were made, each is admitted when it still fits the key's limit, so refused ones count for nobody."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from diffpano.io import storage

WINDOW_S = 60
QUOTAS = "_quotas"


@dataclass
class QuotaState:
    """A key's quota as the answer's headers report it, and the reservation an admitted request made."""

    limit: int
    remaining: int
    reset_s: float  # until the current minute ends
    allowed: bool = True
    reservation: str | None = None

    def headers(self) -> dict[str, str]:
        """x-ratelimit-*-images headers (OpenAI's names), and Retry-After when refused."""
        out = {"x-ratelimit-limit-images": str(self.limit), "x-ratelimit-remaining-images": str(self.remaining),
               "x-ratelimit-reset-images": f"{math.ceil(self.reset_s)}s"}
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.reset_s)))
        return out


def _images(uri: str) -> int:
    """The images a reservation file holds (the last part of its name)."""
    return int(uri.rsplit("-", 1)[-1])


def current_window() -> tuple[int, float]:
    """The minute now (its index since the epoch) and the seconds until it ends."""
    now = time.time()
    window = int(now // WINDOW_S)
    return window, (window + 1) * WINDOW_S - now


def admitted(held: list[str], limit: int) -> tuple[set[str], int]:
    """The reservations admitted, in the order they were made, each when it still fits: every replica reading the
    same files reaches the same decisions, and a refused one counts for nobody. Also the images they hold."""
    chosen, total = set(), 0
    for uri in held:
        if total + _images(uri) <= limit:
            chosen.add(uri)
            total += _images(uri)
    return chosen, total


class Quotas:
    """The limits (images per minute by key name, and a default) and the reservations under root/_quotas."""

    def __init__(self, root: str, default: int | None, per_key: dict[str, int]) -> None:
        self.root, self.default, self.per_key = root, default, dict(per_key)

    def limit(self, key_name: str) -> int | None:
        """The key's images per minute; None: no quota."""
        return self.per_key.get(key_name, self.default)

    def _reservations(self, key_name: str, window: int) -> list[str]:
        """The key's reservations in this window, in the order they were made; windows before the previous one are
        deleted (one minute of slack for replicas whose clocks disagree)."""
        files = [u for u in storage.list_files(storage.join(self.root, QUOTAS, key_name))
                 if not u.rsplit("/", 1)[-1].startswith(".")]  # a write still in its temporary file
        stale = [u for u in files if int(u.rsplit("/", 2)[-2]) < window - 1]
        if stale:
            storage.delete_files(stale)
        return sorted((u for u in files if int(u.rsplit("/", 2)[-2]) == window), key=lambda u: u.rsplit("/", 1)[-1])

    def take(self, key_name: str, images: int) -> QuotaState | None:
        """Reserve `images` for the key if its minute allows (refused reservations are removed); None: no quota."""
        limit = self.limit(key_name)
        if limit is None:
            return None
        window, reset = current_window()
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}-{images}"
        mine = storage.join(self.root, QUOTAS, key_name, str(window), name)
        storage.write_bytes(mine, b"")
        held = self._reservations(key_name, window)
        if mine not in held:  # a listing that lags the write still counts this request
            held = sorted([*held, mine], key=lambda u: u.rsplit("/", 1)[-1])
        chosen, total = admitted(held, limit)
        if mine not in chosen:
            storage.delete_files([mine])
            return QuotaState(limit, max(0, limit - total), reset, allowed=False)
        return QuotaState(limit, max(0, limit - total), reset, reservation=mine)

    def refund(self, state: QuotaState | None) -> None:
        """Give back an admitted request's images (it was refused after all: bad input found later, or overload)."""
        if state is not None and state.reservation is not None:
            storage.delete_files([state.reservation])

    def peek(self, key_name: str) -> QuotaState | None:
        """The key's quota now, reserving nothing; None: no quota."""
        limit = self.limit(key_name)
        if limit is None:
            return None
        window, reset = current_window()
        _, total = admitted(self._reservations(key_name, window), limit)
        return QuotaState(limit, max(0, limit - total), reset)
