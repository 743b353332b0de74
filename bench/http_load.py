"""HTTP load on POST /transfer: the batched service against the same service configured naively, and against the
obvious wrapper of the model (`bench/naive_wrapper.py`: a synchronous FastAPI endpoint, Pillow decode, batch-1
model call, PNG out).

    python -m bench.http_load [--weights DIR] [--concurrency 1 4 16 64] [--requests 400] [--seconds 20] [--device auto]
                              [--write]

Starts real uvicorn processes on loopback: `did serve` with the batcher on (DID_MAX_BATCH=32, DID_MAX_WAIT_MS=5;
batched-cl adds DID_CHANNELS_LAST=true; batched-bf16 adds DID_DTYPE=bfloat16 and DID_CHANNELS_LAST=true where bf16
is native; batched-2w runs two uvicorn worker processes in channels_last, each with its own batcher and its share of
torch's threads; batched-2w-nocheck is batched-2w with the out-of-domain check off, DID_DOMAIN_CHECK=false;
batched-8w-bf16, for a GPU host and only when named, eight worker processes computing in bf16),
`did serve` naive (DID_MAX_BATCH=1, DID_MAX_WAIT_MS=0: one model call per request), the wrapper, and the floor
(`bench/http_floor.py`: the service's form model, errors and middlewares, no image or model work: what the web layer
alone costs), each with one worker (but batched-2w* and batched-8w-bf16) on the same checkpoint and device, and at each concurrency drives one right after the other with a closed loop of
`concurrency` asyncio clients, each level bounded by --requests and --seconds. The clients are minimal keep-alive
HTTP/1.1 connections by default; `--client httpx` uses httpx.AsyncClient, which costs about 4 ms of CPU per
request on this class of machine (as much as the service's own work outside the model, taken from the same two
cores). httpx checks the answers during the warm-up either way. Prints requests/s, p50, p99 and the CPU time per
request (the server's processes, the load generator) per level and the table; --write also writes the table into
docs/benchmarks.md.
Without --weights it uses a slim 64 px checkpoint from weights/ when one exists, else random slim 64 px weights.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from training.markdown import table

from .report import write_section

ROOT = Path(__file__).resolve().parent.parent
BATCHED = {"DID_MAX_BATCH": "32", "DID_MAX_WAIT_MS": "5"}
CONFIGS = {  # the did serve settings of each configuration (DID_WORKERS becomes its --workers)
    "batched": BATCHED,
    "batched-cl": {**BATCHED, "DID_CHANNELS_LAST": "true"},
    "batched-bf16": {**BATCHED, "DID_DTYPE": "bfloat16", "DID_CHANNELS_LAST": "true"},
    "batched-2w": {**BATCHED, "DID_WORKERS": "2", "DID_CHANNELS_LAST": "true"},
    "batched-2w-nocheck": {**BATCHED, "DID_WORKERS": "2", "DID_CHANNELS_LAST": "true", "DID_DOMAIN_CHECK": "false"},
    # a GPU host's layout: eight processes decode, encode and batch for one GPU (bf16); asked for by name only
    "batched-8w-bf16": {**BATCHED, "DID_WORKERS": "8", "DID_DTYPE": "bfloat16"},
    "naive": {"DID_MAX_BATCH": "1", "DID_MAX_WAIT_MS": "0"},
    "wrapper": {},  # bench/naive_wrapper.py, not did serve
    "floor": {},  # bench/http_floor.py: the service's web layer alone, no image or model work
}
APPS = {"wrapper": "bench.naive_wrapper:app", "floor": "bench.http_floor:app"}  # the rows that are not did serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_weights(given: Path | None, tmp: Path) -> tuple[Path, str]:
    """(directory holding one checkpoint, how it was chosen)."""
    import models
    from models.config import preset

    if given is not None:
        return given, f"{given} (given)"
    slim = preset("slim", image_size=64)
    for card_path in sorted((ROOT / "weights").glob("*.json")):
        try:
            card = models.read_card(card_path)
        except models.CheckpointError:
            continue
        cfg = card["config"]
        if cfg.get("image_size") == 64 and all(cfg.get(k) == getattr(slim, k) for k in ("base_width", "max_width", "code_channels", "sep_channels")):
            out = tmp / "weights"
            out.mkdir()
            for src in models.checkpoint.paths(card_path):
                (out / src.name).symlink_to(src)
            return out, f"trained slim 64 px checkpoint weights/{card_path.name}"
    import torch

    torch.manual_seed(0)
    out = tmp / "weights"
    models.save(models.Disentangler(preset("slim", image_size=64, domain_a="smile", domain_b="glasses")), out / "slim64_random")
    return out, "slim preset, 64 px, random weights (no trained slim 64 px checkpoint in weights/)"


def face_pngs(size: int = 128) -> tuple[bytes, bytes]:
    """A content and a guide image: synthetic benchmark faces when the renderer is there, else drawn ones."""
    from PIL import Image, ImageDraw

    try:
        import torch

        from models.images import to_pil
        from training.synthetic import render_domain

        imgs = [to_pil(render_domain("smile_glasses", dom, torch.tensor([3]), size=size)[0]) for dom in ("a", "b")]
    except Exception:  # the renderer is optional here
        imgs = []
        for seed in (1, 5):
            im = Image.new("RGB", (size, size), (40 + seed * 30, 90, 160))
            ImageDraw.Draw(im).ellipse([size * .2, size * .15, size * .8, size * .9], fill=(230, 190 - seed * 7, 160))
            imgs.append(im)
    out = []
    for im in imgs:
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out[0], out[1]


# The service answers the model's square, as the wrapper does (the default, output=full, pastes it back at the
# upload's size); a field the wrapper does not declare, FastAPI ignores there.
FORM = {"output": "model"}


def multipart(files: dict[str, bytes], fields: dict[str, str] = FORM) -> tuple[bytes, str]:
    """One pre-encoded multipart body, sent as is by every request (the client's own cost stays small)."""
    boundary = "did-bench-boundary-7c1e"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + v + b"\r\n"
        for k, v in files.items()
    ] + [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def default_configs(device: str) -> list[str]:
    """Every configuration but batched-8w-bf16 (a GPU host's, given by name); batched-bf16 only where bf16 is native
    (CUDA, or a CPU with AVX512-BF16 or AMX)."""
    import torch

    from models import resolve_device
    from models.checkpoint import compute_dtype

    bf16 = compute_dtype(resolve_device(device), "bfloat16")[0] == torch.bfloat16
    return [name for name in CONFIGS if (bf16 or name != "batched-bf16") and name != "batched-8w-bf16"]


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process `root` and its live descendants, from /proc (nan where there is none)."""
    procs: dict[int, tuple[int, float]] = {}  # pid -> (parent, CPU seconds)
    try:
        tick = os.sysconf("SC_CLK_TCK")
        entries = [d for d in Path("/proc").iterdir() if d.name.isdigit()]
    except (OSError, ValueError, AttributeError):
        return float("nan")
    for d in entries:
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue  # exited meanwhile
        procs[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if root not in procs:
        return float("nan")
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (parent, _) in procs.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(procs[pid][1] for pid in tree)


class Server:
    def __init__(self, weights: Path, name: str, log: Path, device: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **CONFIGS[name], "DID_ACCESS_LOG": "false", "DID_LOG_LEVEL": "warning"}
        if name in APPS:
            card = sorted(weights.glob("*.json"))[0]
            full_env |= {"NAIVE_WEIGHTS": str(card.with_suffix("")), "NAIVE_DEVICE": device}
            cmd = [sys.executable, "-m", "uvicorn", APPS[name], "--host", "127.0.0.1", "--port",
                   str(self.port), "--workers", "1", "--log-level", "warning", "--no-access-log"]
        else:
            cmd = [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(self.port),
                   "--weights", str(weights), "--workers", CONFIGS[name].get("DID_WORKERS", "1"), "--device", device]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s; see {self.log.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds so far of the server and its live worker processes (Linux /proc; nan elsewhere)."""
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class RawClient:
    """One keep-alive HTTP/1.1 connection sending one pre-built request: about a tenth of httpx's CPU per request,
    which matters when the load generator shares two cores with the server it measures."""

    def __init__(self, url: str, body: bytes, ctype: str):
        host, port = url.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        self.request = (f"POST /transfer HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(*self.addr)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(url: str, body: bytes, ctype: str, concurrency: int, requests: int, seconds: float, client: str = "raw") -> dict[str, float]:
    """Closed loop: `concurrency` clients each send the next request when their last one is answered."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as shared:

        async def worker() -> None:
            nonlocal issued, errors
            raw = RawClient(url, body, ctype) if client == "raw" else None
            try:
                while issued < requests and time.perf_counter() < deadline:
                    issued += 1
                    t0 = time.perf_counter()
                    try:
                        if raw is not None:
                            status, content = await raw.post()
                        else:
                            r = await shared.post("/transfer", content=body, headers={"content-type": ctype})
                            status, content = r.status_code, r.content
                        ok = status == 200 and content[:4] == b"\x89PNG"
                    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, StopIteration, ValueError):
                        ok = False
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1
            finally:
                if raw is not None:
                    await raw.close()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {"done": len(latencies), "errors": errors, "wall_s": wall, "rps": len(latencies) / wall, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="directory with one checkpoint (default: see above)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=400, help="most requests per level")
    p.add_argument("--seconds", type=float, default=20.0, help="most seconds per level")
    p.add_argument("--warmup", type=int, default=20, help="requests before each configuration is measured")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS),
                   help="default: all (batched-bf16 only where bf16 is native)")
    p.add_argument("--device", default="auto", help="the device of every server (auto: CUDA when present)")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="raw: minimal keep-alive HTTP/1.1 on asyncio streams (default); httpx: httpx.AsyncClient")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md")
    args = p.parse_args()
    args.configs = args.configs or default_configs(args.device)

    with tempfile.TemporaryDirectory(prefix="did-http-bench-") as tmp:
        weights, origin = pick_weights(args.weights, Path(tmp))
        content, guide = face_pngs()
        body, ctype = multipart({"content": content, "guide": guide})
        results: dict[tuple[str, int], dict[str, float]] = {}
        # Both servers run side by side (an idle one costs nothing) and every level measures one right after the
        # other, so a change in the machine's background load hits both configurations alike.
        servers = {name: Server(weights, name, Path(tmp) / f"{name}.log", args.device) for name in args.configs}
        try:
            for name, server in servers.items():
                server.wait_ready()
                asyncio.run(drive(server.url, body, ctype, 4, args.warmup, 30, "httpx"))  # httpx checks the answers too
            for c in args.concurrency:
                for name, server in servers.items():
                    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
                    r = asyncio.run(drive(server.url, body, ctype, c, args.requests, args.seconds, args.client))
                    answered = max(1, r["done"] + r["errors"])
                    r["server_cpu_ms"] = (server.cpu_seconds() - server_cpu) / answered * 1000
                    r["client_cpu_ms"] = (time.process_time() - client_cpu) / answered * 1000
                    results[name, c] = r
                    print(f"{name:8s} c={c:3d}: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms"
                          f"  CPU {r['server_cpu_ms']:.2f} + {r['client_cpu_ms']:.2f} ms"
                          f"  ({r['done']} ok, {r['errors']} errors, {r['wall_s']:.1f} s)", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    rows = []
    for c in args.concurrency:
        for name in args.configs:
            r = results[name, c]
            ratios = [f"{r['rps'] / results[other, c]['rps']:.2f}x" if name.startswith("batched") and (other, c) in results
                      else "" for other in ("naive", "wrapper")]
            rows.append([name, c, r["done"], r["errors"], f"{r['rps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                         f"{r['server_cpu_ms']:.2f}", f"{r['client_cpu_ms']:.2f}", *ratios])
    threads = os.environ.get("DID_TORCH_THREADS", "0 (the default: torch's own count, one per physical core)")
    body_md = (
        f"POST /transfer (content + guide PNG, {len(body) // 1024} KiB multipart, {', '.join(f'{k}={v}' for k, v in FORM.items())}), answered as PNG; one uvicorn worker but for batched-2w* and batched-8w-bf16, "
        f"device {args.device}, fp32 unless named; closed loop over loopback from the same machine ({args.client} client); at most {args.requests} requests or "
        f"{args.seconds:g} s per level. Model: {origin}.\n"
        + "; ".join(f"{name}: {', '.join(f'{k}={v}' for k, v in env.items())}" for name in args.configs if (env := CONFIGS[name]))
        + f"; all with DID_TORCH_THREADS={threads}. wrapper: bench/naive_wrapper.py (a synchronous FastAPI endpoint, "
        "Pillow decode, batch-1 model call, PNG out); floor: bench/http_floor.py (the service's form model and middlewares, "
        "both uploads read, one fixed 64 px PNG answered: the web layer alone).\n\n"
        + "CPU ms / request: CPU time (user + system) of the server's processes, and of this load generator, over the "
        "level, divided by the requests answered; on a machine with P cores no configuration answers more than "
        "P x 1000 / (their sum) requests/s.\n\n"
        + table(["config", "concurrency", "ok", "errors", "requests/s", "p50 ms", "p99 ms", "server CPU ms / request",
                 "client CPU ms / request", "batched / naive", "batched / wrapper"], rows)
    )
    print()
    print(body_md)
    if args.write:
        print(f"\nwrote {write_section('http', 'HTTP service throughput', body_md)}")
    print(json.dumps({f"{k[0]}@{k[1]}": v for k, v in results.items()}))


if __name__ == "__main__":
    main()
