"""The dynamic batcher: batched answers equal unbatched ones, concurrent requests equal sequential ones, a full
queue answers 503 with Retry-After, and a failing or abandoned job harms no other."""
from __future__ import annotations

import asyncio
import io
import threading
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import models
from app.batcher import Batcher
from app.errors import NotReady, Overloaded
from app.main import create_app
from app.metrics import Metrics
from app.routes.edit import TransferPlan
from models import Codes
from models.networks import inference_ready
from app.settings import Settings

from .conftest import draw_face, encode_image


@pytest.fixture
def tiny_model(service_weights):
    return inference_ready(models.load(service_weights / "smile_glasses"))  # as the registry loads it


def run(coro):
    return asyncio.run(coro)


async def hold(batcher: Batcher) -> tuple[threading.Event, asyncio.Future]:
    """Occupy the batcher's model thread until the returned event is set (the future is that blocking job)."""
    gate = threading.Event()
    blocker = asyncio.ensure_future(batcher.call(lambda m: gate.wait(10)))
    await asyncio.sleep(0.05)
    return gate, blocker


def test_batched_equals_unbatched(tiny_model):
    """Jobs of 1-3 images each, gathered into shared model calls, give each job what it gets alone."""
    torch.manual_seed(0)
    inputs = [torch.rand(n, 3, 64, 64) * 2 - 1 for n in (1, 2, 3, 1, 2, 1, 3, 2)]

    async def go():
        metrics = Metrics()
        b = Batcher("m", tiny_model, max_batch=32, max_wait_ms=50, queue_size=64, metrics=metrics)
        b.start()
        try:
            codes = await asyncio.gather(*(b.encode(x) for x in inputs))
            images = await asyncio.gather(*(b.decode(c) for c in codes))
        finally:
            await b.stop()
        return codes, images, metrics

    codes, images, metrics = run(go())
    enc = {s.name + s.labels.get("le", ""): s.value for m in metrics.batch_size.collect() for s in m.samples if s.labels["kind"] == "encode"}
    assert enc["did_batch_size_sum"] == sum(len(x) for x in inputs)  # every image went through ...
    assert enc["did_batch_size_count"] < len(inputs)  # ... in fewer model calls than jobs
    with torch.inference_mode():
        for x, c, img in zip(inputs, codes, images):
            alone = tiny_model.encode(x)
            for got, want in zip(c, alone):
                assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
            assert torch.allclose(img, tiny_model.decode(*alone), atol=1e-5)


def test_max_batch_splits_and_oversized_jobs_run_alone(tiny_model):
    async def go():
        metrics = Metrics()
        b = Batcher("m", tiny_model, max_batch=4, max_wait_ms=20, queue_size=64, metrics=metrics)
        b.start()
        try:
            outs = await asyncio.gather(*(b.encode(torch.zeros(n, 3, 64, 64)) for n in (3, 3, 6, 1)))
        finally:
            await b.stop()
        return outs, metrics

    outs, metrics = run(go())
    assert [o.common.shape[0] for o in outs] == [3, 3, 6, 1]
    samples = {s.name + s.labels.get("le", ""): s.value for m in metrics.batch_size.collect() for s in m.samples}
    assert samples["did_batch_size_count"] >= 3 and samples["did_batch_size_sum"] == 13
    assert samples["did_batch_size_bucket4.0"] == samples["did_batch_size_count"] - 1  # only the 6-image job exceeded 4


def test_full_queue_is_overloaded_and_failures_stay_per_job(tiny_model):
    async def go():
        b = Batcher("m", tiny_model, max_batch=1, max_wait_ms=0, queue_size=1)
        b.start()
        try:
            gate, blocker = await hold(b)
            first = asyncio.ensure_future(b.encode(torch.zeros(1, 3, 64, 64)))
            await asyncio.sleep(0)
            refused = None
            try:
                await b.encode(torch.zeros(1, 3, 64, 64))
            except Overloaded as e:  # queue of one, already holding `first`
                refused = e
            gate.set()
            await blocker
            await first
            failing = b.call(lambda m: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                await failing
            again = await b.encode(torch.zeros(2, 3, 64, 64))
        finally:
            await b.stop()
        with pytest.raises(NotReady):
            await b.encode(torch.zeros(1, 3, 64, 64))
        return refused, again

    refused, again = run(go())
    assert isinstance(refused, Overloaded) and refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert again.common.shape[0] == 2


def test_cancelled_requests_are_skipped(tiny_model):
    async def go():
        b = Batcher("m", tiny_model, max_batch=8, max_wait_ms=0, queue_size=8)
        b.start()
        try:
            gate, blocker = await hold(b)
            gone = asyncio.ensure_future(b.encode(torch.zeros(1, 3, 64, 64)))
            kept = asyncio.ensure_future(b.encode(torch.ones(1, 3, 64, 64)))
            await asyncio.sleep(0)
            gone.cancel()
            gate.set()
            await blocker
            return await kept
        finally:
            await b.stop()

    assert run(go()).common.shape[0] == 1


# --- through the app ------------------------------------------------------------------------------------------------------


def _multipart(i: int) -> dict:
    return {"content": ("c.png", encode_image(draw_face(i, 80)), "image/png"),
            "guide": ("g.png", encode_image(draw_face(i + 7, 72)), "image/png")}


async def _with_app(settings: Settings, fn):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
            return await fn(app, client)


def test_concurrent_requests_equal_sequential_ones(service_weights):
    n = 12

    async def go(app, client):
        sequential = [await client.post("/transfer", files=_multipart(i)) for i in range(n)]
        concurrent = await asyncio.gather(*(client.post("/transfer", files=_multipart(i)) for i in range(n)))
        text = (await client.get("/metrics")).text
        return sequential, concurrent, text

    sequential, concurrent, text = run(_with_app(Settings(weights=service_weights, max_batch=32, max_wait_ms=20), go))
    for s, c in zip(sequential, concurrent):
        assert s.status_code == c.status_code == 200
        a = np.asarray(Image.open(io.BytesIO(s.content)), dtype=np.int16)
        b = np.asarray(Image.open(io.BytesIO(c.content)), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
        assert s.headers["x-detected-domain"] == c.headers["x-detected-domain"]
    # some model call served several requests at once
    big = [line for line in text.splitlines() if line.startswith('did_batch_size_bucket{kind="encode",le="2.0"')]
    total = [line for line in text.splitlines() if line.startswith('did_batch_size_count{kind="encode"')]
    assert float(big[0].split()[-1]) < float(total[0].split()[-1])


def test_full_queue_answers_503_with_retry_after(service_weights):
    async def go(app, client):
        batcher = app.state.registry.get(None).batcher
        gate, blocker = await hold(batcher)
        first = asyncio.ensure_future(client.post("/transfer", files=_multipart(0)))  # its encode job fills the queue
        for _ in range(100):
            await asyncio.sleep(0.01)
            if batcher.depth:
                break
        refused = await client.post("/transfer", files=_multipart(1))
        gate.set()
        await blocker
        return refused, await first, (await client.get("/metrics")).text

    refused, first, text = run(_with_app(Settings(weights=service_weights, queue_size=1, max_batch=1, max_wait_ms=0), go))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json" and refused.json()["type"].endswith("/overloaded")
    assert first.status_code == 200
    assert 'did_queue_rejected_total{model="smile_glasses"} 1.0' in text


def test_render_jobs_encode_only_the_codes_they_read_and_fail_alone(tiny_model):
    """Render jobs share one call per encoder, and each encoder sees only the images whose codes a job asked for:
    plain transfers to b run E_c on the contents and E_sB on the guides, never E_sA. Batched answers equal the
    core's; a failing plan fails its own request only."""
    torch.manual_seed(1)
    xs = [torch.rand(2, 3, 64, 64) * 2 - 1 for _ in range(4)]
    parts = tiny_model.transfer_parts(1)
    seen = {name: 0 for name in ("enc_common", "enc_a", "enc_b")}
    hooks = [getattr(tiny_model, name).register_forward_hook(
        lambda mod, inp, out, name=name: seen.__setitem__(name, seen[name] + len(inp[0]))) for name in seen]

    async def go():
        metrics = Metrics()
        b = Batcher("m", tiny_model, max_batch=32, max_wait_ms=50, queue_size=16, metrics=metrics)
        b.start()
        try:
            # the last job's plan is planned with the others and fails their shared call: it alone fails
            return await asyncio.gather(*(b.render(x, ToB(), parts) for x in xs), b.render(xs[0], ToB(bad=True), parts),
                                        return_exceptions=True), metrics
        finally:
            await b.stop()

    try:
        results, metrics = run(go())
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(results[-1], ValueError)
    assert seen == {"enc_common": len(xs) + 1, "enc_a": 0, "enc_b": len(xs) + 1}
    calls = {s.labels["kind"]: s.value for m in metrics.batch_size.collect() for s in m.samples if s.name == "did_batch_size_count"}
    assert calls["encode"] < len(xs)  # shared encode calls
    with torch.inference_mode():
        for x, (image, mask, extra, errors) in zip(xs, results[:-1]):
            assert extra == "ok" and mask is None and errors is None
            assert torch.allclose(image, tiny_model.transfer(x[:1], x[1:], target=1), atol=1e-5)


def test_the_routes_plans_of_many_jobs_equal_each_job_planned_alone(tiny_model):
    """TransferPlan, IntersectPlan and RemovePlan plan every job of a batch in one call: jobs of several rows (faces),
    detected and named targets, and different strengths, keeps, thresholds and removals side by side give each job
    the edit and extra it gets planned alone."""
    from app.routes.edit import IntersectPlan, RemovePlan

    torch.manual_seed(3)
    with torch.inference_mode():
        def images(n):  # one Codes per image, all three codes (as a scored batch encodes them)
            return [tiny_model.encode(torch.rand(1, 3, 64, 64) * 2 - 1) for _ in range(n)]

        cases = [
            [TransferPlan(1, None, 1.0, False), TransferPlan(2, 0, 0.5, True), TransferPlan(3, None, 2.0, False), TransferPlan(1, 1, 1.0, True)],
            [IntersectPlan(2, 1.0), IntersectPlan(1, 0.3)],
            [RemovePlan(1, None), RemovePlan(2, 0, 0.3, True), RemovePlan(3, 2), RemovePlan(1, None, 0.5)],
        ]
        for plans in cases:
            guides = 2 if isinstance(plans[0], IntersectPlan) else 1 if isinstance(plans[0], TransferPlan) else 0
            codes = [images(p.rows + guides) for p in plans]
            together, extras = type(plans[0]).many(tiny_model, plans, codes)
            start = 0
            for p, c, extra in zip(plans, codes, extras):
                alone, want = type(p).many(tiny_model, [p], [c])
                assert extra == want[0]
                part = together.index(slice(start, start + p.rows))
                for got, exp in zip((*part.codes, *part.source, *part[2:]), (*alone.codes, *alone.source, *alone[2:])):
                    torch.testing.assert_close(got, exp)
                start += p.rows
            assert start == len(together.codes.common)


@dataclass(frozen=True)
class ToB:
    """A test plan: each job's content given its guide's code b; it checks that each image came with only the codes
    its parts asked for, and fails the whole call when one of its jobs is `bad`."""

    rows: int = 1
    bad: bool = False

    @classmethod
    def many(cls, model, plans, codes):
        if any(p.bad for p in plans):
            raise ValueError("bad plan")
        for c, g in codes:
            assert c.sep_a is None and c.sep_b is None and g.common is None and g.sep_a is None
        content, guide = Codes.cat([c for c, _ in codes]), Codes.cat([g for _, g in codes])
        return model.transfer_edit(content, guide, torch.ones(len(plans), dtype=torch.long)), ["ok"] * len(plans)


def test_scored_render_jobs_measure_every_image_s_reconstruction_error(tiny_model):
    """score=True: each job gets the reconstruction error of each of its images (content and guide), the same as
    models.calibration computes alone, from one extra decode call for the whole batch; unscored jobs get None."""
    from models.calibration import reconstruction_error

    torch.manual_seed(2)
    xs = [torch.rand(2, 3, 64, 64) * 2 - 1 for _ in range(3)]
    parts = tiny_model.transfer_parts(1)

    async def go():
        metrics = Metrics()
        b = Batcher("m", tiny_model, max_batch=32, max_wait_ms=50, queue_size=16, metrics=metrics)
        b.start()
        try:
            return await asyncio.gather(*(b.render(x, TransferPlan(1, 1, 1.0, False), parts, score=i < 2)
                                          for i, x in enumerate(xs))), metrics
        finally:
            await b.stop()

    results, metrics = run(go())
    with torch.inference_mode():
        for i, (x, r) in enumerate(zip(xs, results)):
            if i < 2:
                torch.testing.assert_close(r.errors, reconstruction_error(tiny_model, x), atol=1e-5, rtol=1e-4)
                assert torch.allclose(r.images, tiny_model.transfer(x[:1], x[1:], target=1), atol=1e-5)
            else:
                assert r.errors is None
    calls = {s.labels["kind"]: s.value for m in metrics.batch_size.collect() for s in m.samples if s.name == "did_batch_size_count"}
    assert calls["score"] <= calls["render"]


# --- deadlines, clients that go away, where the time goes -----------------------------------------------------------


def _encoded_rows(model) -> tuple[dict[str, int], list]:
    """Images each encoder has seen since the call, and the hooks that count them (remove when done)."""
    seen = {"enc_common": 0, "enc_a": 0, "enc_b": 0}
    return seen, [getattr(model, k).register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, seen[k] + len(inp[0])))
                  for k in seen]


def test_a_request_past_its_deadline_answers_504_and_its_job_never_reaches_the_model(service_weights):
    async def go(app, client):
        entry = app.state.registry.get(None)
        seen, hooks = _encoded_rows(entry.model)
        try:
            gate, blocker = await hold(entry.batcher)
            late = await client.post("/transfer", files=_multipart(0))  # waits behind the blocked model thread
            gate.set()
            await blocker
            await asyncio.sleep(0.1)  # the worker gathers (and drops) the late job
            encoded = dict(seen)
            ok = await client.post("/transfer", files=_multipart(1))
            return late, encoded, ok, (await client.get("/metrics")).text
        finally:
            for h in hooks:
                h.remove()

    late, encoded, ok, text = run(_with_app(Settings(weights=service_weights, request_timeout_s=0.3, max_wait_ms=0), go))
    assert late.status_code == 504 and late.headers["content-type"] == "application/problem+json"
    assert late.json()["type"].endswith("/timeout") and "DID_REQUEST_TIMEOUT_S" in late.json()["detail"]
    assert encoded == {"enc_common": 0, "enc_a": 0, "enc_b": 0}
    assert ok.status_code == 200
    assert 'did_jobs_dropped_total{model="smile_glasses",reason="deadline"} 1.0' in text
    assert 'did_requests_total{method="POST",route="/transfer",status="504"} 1.0' in text


def test_a_client_that_disconnects_has_its_job_dropped_before_the_model_call(service_weights):
    """A real uvicorn server: the client sends a whole /transfer request and closes the socket while its job waits
    behind a blocked model thread; the job never reaches an encoder."""
    import socket

    import uvicorn

    from .conftest import free_port

    app = create_app(Settings(weights=service_weights, max_wait_ms=0))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert server.started
        entry = app.state.registry.get(None)
        seen, hooks = _encoded_rows(entry.model)
        gate = threading.Event()
        blocker = asyncio.run_coroutine_threadsafe(entry.batcher.call(lambda m: gate.wait(10)), loop)
        threading.Event().wait(0.1)
        request = httpx.Request("POST", "http://x/transfer", files=_multipart(0))
        body, content_type = request.read(), request.headers["content-type"]
        queued = lambda: list(entry.batcher._queue._queue)  # noqa: E731  (the jobs waiting, read from this thread)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST /transfer HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            for _ in range(200):  # until the job waits behind the blocked model thread
                if queued():
                    break
                threading.Event().wait(0.05)
            assert queued()
        for _ in range(200):  # until the server has seen the connection close and the request stopped waiting
            if all(j.future.cancelled() for j in queued()):
                break
            threading.Event().wait(0.05)
        gate.set()
        blocker.result(10)
        threading.Event().wait(0.2)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for h in hooks:
            h.remove()
    finally:
        server.should_exit = True
        thread.join(20)
    assert seen == {"enc_common": 0, "enc_a": 0, "enc_b": 0}
    assert 'did_jobs_dropped_total{model="smile_glasses",reason="disconnected"} 1.0' in text


def test_stage_metrics_and_the_png_effort_setting(service_weights):
    async def go(app, client):
        r = await client.post("/transfer", files=_multipart(2))
        return r, (await client.get("/metrics")).text

    fast, text = run(_with_app(Settings(weights=service_weights, png_level=0), go))
    small, _ = run(_with_app(Settings(weights=service_weights, png_level=9), go))
    for stage in ("decode", "queue", "model", "encode"):
        assert f'did_stage_duration_seconds_count{{stage="{stage}"}} 1.0' in text
    assert fast.status_code == small.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fast.content))), np.asarray(Image.open(io.BytesIO(small.content))))
    assert len(fast.content) > len(small.content)


def test_fixed_batch_shapes_and_channels_last_answer_as_the_default(service_weights):
    async def go(app, client):
        return [await client.post("/transfer", files=_multipart(i)) for i in range(2)]

    default = run(_with_app(Settings(weights=service_weights), go))
    for fixed in (run(_with_app(Settings(weights=service_weights, compile="buckets"), go)),
                  run(_with_app(Settings(weights=service_weights, channels_last=True), go))):
        for a, b in zip(default, fixed):
            assert a.status_code == b.status_code == 200
            assert np.abs(np.asarray(Image.open(io.BytesIO(a.content)), dtype=np.int16)
                          - np.asarray(Image.open(io.BytesIO(b.content)), dtype=np.int16)).max() <= 1


def test_bf16_serves_where_the_cpu_has_it_and_falls_back_to_float32_elsewhere(service_weights, monkeypatch):
    """DID_DTYPE=bfloat16 on a CPU with native bf16 computes in bf16 and answers what float32 answers to within
    bf16's rounding; where the CPU lacks it (or for float16) the service computes in float32."""
    from models import checkpoint

    async def go(app, client):
        return app.state.registry.dtype, [await client.post("/transfer", files=_multipart(i)) for i in range(2)]

    cpu = torch.device("cpu")
    monkeypatch.setattr(checkpoint, "cpu_has_bf16", lambda: False)
    assert checkpoint.compute_dtype(cpu, "bfloat16")[0] == torch.float32
    assert "no native bf16" in checkpoint.compute_dtype(cpu, "bfloat16")[1]
    assert checkpoint.compute_dtype(cpu, "float16") == (torch.float32, "float16 on cpu: float16 is computed on CUDA only; computing in float32")
    assert checkpoint.compute_dtype(cpu, "float32") == (torch.float32, None)
    dtype, _ = run(_with_app(Settings(weights=service_weights, dtype="bfloat16"), go))
    assert dtype == torch.float32

    monkeypatch.setattr(checkpoint, "cpu_has_bf16", lambda: True)  # bf16 itself runs on any CPU, emulated where not native
    assert checkpoint.compute_dtype(cpu, "bfloat16") == (torch.bfloat16, None)
    _, full = run(_with_app(Settings(weights=service_weights), go))
    dtype, half = run(_with_app(Settings(weights=service_weights, dtype="bfloat16"), go))
    assert dtype == torch.bfloat16
    for a, b in zip(full, half):
        assert a.status_code == b.status_code == 200
        diff = np.asarray(Image.open(io.BytesIO(a.content)), dtype=np.float64) - np.asarray(Image.open(io.BytesIO(b.content)))
        assert 0 < np.abs(diff).max() and 10 * np.log10(255**2 / (diff**2).mean()) > 30
