"""Latent stores: the in-process LRU with TTL, and Redis shared by two app instances (a real redis-server)."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch
from fastapi.testclient import TestClient

from app.errors import UnknownLatent
from app.main import create_app
from app.settings import Settings
from app.store import Latent, MemoryStore, RedisStore
from models import Codes

from .conftest import draw_face, encode_image


def codes(seed: float) -> Codes:
    return Codes(torch.full((24, 2, 2), seed), torch.arange(16.0).view(4, 2, 2) * seed, torch.randn(4, 2, 2))


def test_memory_store_ttl_and_lru():
    now = [0.0]
    store = MemoryStore(ttl_s=10, capacity=2, clock=lambda: now[0])

    async def go():
        a = await store.put(Latent("m", codes(1.0), {"detected": "a"}))
        b = await store.put(Latent("m", codes(2.0)))
        got = await store.get(a)  # a is now the most recently used
        assert got.model == "m" and got.meta == {"detected": "a"} and torch.equal(got.codes.common, codes(1.0).common)
        c = await store.put(Latent("m", codes(3.0)))  # evicts b, the least recently used
        with pytest.raises(UnknownLatent):
            await store.get(b)
        await store.get(c)
        now[0] = 10.5
        with pytest.raises(UnknownLatent):
            await store.get(a)
        assert len({a, b, c}) == 3 and all(len(k) >= 20 for k in (a, b, c))

    asyncio.run(go())


def test_redis_pack_roundtrip():
    lat = Latent("smile_glasses", codes(0.5), {"detected": "b"})
    back = RedisStore.unpack(RedisStore.pack(lat))
    assert back.model == lat.model and back.meta == lat.meta
    for x, y in zip(back.codes, lat.codes):
        assert x.dtype == torch.float32 and torch.equal(x, y)


def _client(weights, redis_url, ttl=3600):
    client = TestClient(create_app(Settings(weights=weights, redis_url=redis_url, latent_ttl_s=ttl)))
    client.__enter__()
    return client


def test_two_replicas_share_ids_through_redis(service_weights, redis_url):
    one, two = _client(service_weights, redis_url), _client(service_weights, redis_url)
    try:
        image = encode_image(draw_face(1, 80))
        j = one.post("/encode", files={"image": ("x.png", image)}, data={"include_latents": "true"}).json()
        k = two.post("/encode", files={"image": ("y.png", encode_image(draw_face(2, 80)))}).json()
        # each replica resolves the other's ids: decode on two what one encoded, interpolate across both
        r1 = two.post("/decode", json={"common": j["id"], "sep_a": j["id"], "sep_b": j["id"]})
        r2 = one.post("/decode", json={"common": j["latents"]["common"], "sep_a": j["latents"]["sep_a"], "sep_b": j["latents"]["sep_b"]})
        assert r1.status_code == r2.status_code == 200 and r1.content == r2.content
        r = one.get(f"/interpolate?start={j['id']}&end={k['id']}&steps=3")
        assert r.status_code == 200
        assert two.get(f"/interpolate?start={j['id']}&end={k['id']}&steps=3").content == r.content
        missing = two.post("/decode", json={"common": "never-issued"})
        assert missing.status_code == 404 and missing.json()["type"].endswith("/unknown-latent")
    finally:
        one.__exit__(None, None, None)
        two.__exit__(None, None, None)


def test_redis_ids_expire(service_weights, redis_url):
    client = _client(service_weights, redis_url, ttl=1)
    try:
        j = client.post("/encode", files={"image": ("x.png", encode_image(draw_face(1, 80)))}).json()
        assert j["expires_in"] == 1
        assert client.post("/decode", json={"common": j["id"]}).status_code == 200
        time.sleep(2.1)
        r = client.post("/decode", json={"common": j["id"]})
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    finally:
        client.__exit__(None, None, None)


def test_redis_down_is_503_not_500(service_weights):
    client = _client(service_weights, "redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        r = client.post("/encode", files={"image": ("x.png", encode_image(draw_face(1, 80)))})
        assert r.status_code == 503 and r.json()["type"].endswith("/unavailable")
    finally:
        client.__exit__(None, None, None)
