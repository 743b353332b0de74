"""Latent ids: the three codes of one encoded image, kept for a while under an unguessable id.

`MemoryStore` (default) is an in-process LRU with a TTL. `RedisStore` keeps each latent as one Redis value with an
expiry (SET ... EX, i.e. SETEX), so every replica pointed at the same Redis resolves every id: a small JSON header
(model, shapes, meta) followed by the codes as raw little-endian float32 bytes.
"""
from __future__ import annotations

import json
import secrets
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from models import Codes

from .errors import Unavailable, UnknownLatent


@dataclass(frozen=True)
class Latent:
    """One image's codes (each (C, H, W), CPU float32) and what the service knows about them."""

    model: str
    codes: Codes
    meta: dict[str, Any] = field(default_factory=dict)


class LatentStore(Protocol):
    ttl_s: int

    async def put(self, latent: Latent) -> str: ...

    async def get(self, latent_id: str) -> Latent: ...

    async def close(self) -> None: ...


def new_id() -> str:
    return secrets.token_urlsafe(16)


def _row(codes: Codes) -> Codes:
    """A private, contiguous float32 copy (the batch tensor it was sliced from can then be freed)."""
    return Codes(*(t.detach().to("cpu", torch.float32).contiguous().clone() for t in codes))


class MemoryStore:
    def __init__(self, ttl_s: int, capacity: int, clock=time.monotonic):
        self.ttl_s, self.capacity, self._clock = ttl_s, capacity, clock
        self._items: OrderedDict[str, tuple[float, Latent]] = OrderedDict()

    async def put(self, latent: Latent) -> str:
        key = new_id()
        self._items[key] = (self._clock() + self.ttl_s, Latent(latent.model, _row(latent.codes), latent.meta))
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return key

    async def get(self, latent_id: str) -> Latent:
        item = self._items.get(latent_id)
        if item is None or item[0] <= self._clock():
            self._items.pop(latent_id, None)
            raise UnknownLatent(f"latent id {latent_id!r} is unknown or has expired")
        self._items.move_to_end(latent_id)
        return item[1]

    async def close(self) -> None:
        self._items.clear()


class RedisStore:
    PREFIX = "did:latent:"

    def __init__(self, url: str, ttl_s: int):
        import redis.asyncio as redis

        self.ttl_s = ttl_s
        self._redis = redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._errors = (redis.ConnectionError, redis.TimeoutError)

    @staticmethod
    def pack(latent: Latent) -> bytes:
        codes = _row(latent.codes)
        header = json.dumps({"model": latent.model, "shapes": [list(t.shape) for t in codes], "meta": latent.meta}).encode()
        data = b"".join(t.numpy().astype("<f4", copy=False).tobytes() for t in codes)
        return struct.pack("<I", len(header)) + header + data

    @staticmethod
    def unpack(blob: bytes) -> Latent:
        (n,) = struct.unpack_from("<I", blob)
        header = json.loads(blob[4 : 4 + n])
        flat = np.frombuffer(blob, dtype="<f4", offset=4 + n)
        tensors, start = [], 0
        for shape in header["shapes"]:
            size = int(np.prod(shape))
            tensors.append(torch.from_numpy(flat[start : start + size].astype(np.float32).reshape(shape)))
            start += size
        return Latent(header["model"], Codes(*tensors), header["meta"])

    async def put(self, latent: Latent) -> str:
        key = new_id()
        try:
            await self._redis.set(self.PREFIX + key, self.pack(latent), ex=self.ttl_s)
        except self._errors as e:
            raise Unavailable(f"latent store unavailable: {e}") from None
        return key

    async def get(self, latent_id: str) -> Latent:
        try:
            blob = await self._redis.get(self.PREFIX + latent_id)
        except self._errors as e:
            raise Unavailable(f"latent store unavailable: {e}") from None
        if blob is None:
            raise UnknownLatent(f"latent id {latent_id!r} is unknown or has expired")
        try:
            return self.unpack(blob)
        except (ValueError, KeyError, TypeError, struct.error) as e:  # not written by this service
            raise UnknownLatent(f"latent id {latent_id!r} holds no readable latent ({e})") from None

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except self._errors:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(redis_url: str | None, ttl_s: int, capacity: int) -> MemoryStore | RedisStore:
    return RedisStore(redis_url, ttl_s) if redis_url else MemoryStore(ttl_s, capacity)
