"""Load on `mmt serve` over loopback: latency and throughput of /v1/vqa and /v1/caption with
dynamic batching and one request at a time.

For each mode the script starts `mmt serve VQA_RUN CAPTION_RUN` on a free loopback port
(batched: `--max-batch 32 --max-wait-ms 10`, the defaults; one at a time: `--max-batch 1`),
warms each endpoint up with `--concurrency` requests, then sends `--requests` requests to each
endpoint in turn from `--concurrency` concurrent clients (httpx, keep-alive connections,
multipart uploads of built-in scenes: Sort-of-CLEVR scenes with their questions for VQA,
shapes scenes for captions, exported with `mmt.data.worlds.export`). Meanwhile /healthz is
polled every 50 ms. Then the server is stopped; the script stops by itself.

Reported per mode and endpoint: p50 and p95 latency (ms, from sending a request to reading its
answer), requests/s (requests / wall time of the run), the count of 5xx answers (must be 0)
and of other non-200 answers, the mean batch size (requests / model calls during the run, from
/v1/models), and the slowest /healthz answer with the count of failed polls. Then the
throughput ratio batched / one at a time.

The clients run in this process, on the same CPU as the server: on a small machine they take
a share of it, which lowers both modes' throughput.

    python benchmarks/serve_load.py --vqa runs/vqa --caption runs/caption [--requests 256] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(folder: Path, scenes: int) -> tuple[list[tuple[bytes, str]], list[bytes]]:
    """(VQA (image, question) pairs, caption images) from built-in scenes written to `folder`."""
    from mmt.data.worlds.export import export_world

    export_world("sort-of-clevr", folder / "vqa", num_scenes=scenes)
    export_world("shapes", folder / "caption", num_scenes=scenes)
    questions = [json.loads(line) for line in (folder / "vqa" / "questions.jsonl").read_text().splitlines()]
    vqa = [((folder / "vqa" / q["image"]).read_bytes() if not Path(q["image"]).is_absolute() else Path(q["image"]).read_bytes(), q["question"])
           for q in questions]
    captions = [p.read_bytes() for p in sorted((folder / "caption").glob("*.png"))]
    return vqa, captions


class Server:
    """`mmt serve` in a subprocess, until `stop`."""

    def __init__(self, vqa: str, caption: str, max_batch: int, max_wait_ms: float, device: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mmt.cli", "serve", f"vqa={vqa}", f"caption={caption}", "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--device", device]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mmt serve stopped: {self.process.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("mmt serve did not answer /healthz within two minutes")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _load(url: str, path: str, bodies: list[dict], requests: int, concurrency: int) -> dict:
    """Send `requests` requests (cycling through `bodies`) from `concurrency` workers."""
    latencies, statuses = [], []
    next_request = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker():
            for i in next_request:
                body = bodies[i % len(bodies)]
                start = time.perf_counter()
                response = await client.post(path, **body)
                latencies.append(time.perf_counter() - start)
                statuses.append(response.status_code)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": requests, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "rps": requests / wall,
            "5xx": sum(s >= 500 for s in statuses), "other": sum(s != 200 and s < 500 for s in statuses)}


def _batches(url: str, path: str) -> dict:
    """The served model's count of batched calls and requests (the model is named as the endpoint)."""
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
        models = json.load(response)["models"]
    return next(m["batches"] for m in models if m["name"] == path.rsplit("/", 1)[1])


async def _poll_health(url: str, stop: asyncio.Event, record: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                ok = (await client.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            record["polls"] += 1
            record["failed"] += not ok
            record["slowest"] = max(record["slowest"], time.perf_counter() - start)
            await asyncio.sleep(0.05)


async def _run_mode(server: Server, bodies: dict[str, list[dict]], requests: int, concurrency: int) -> dict:
    health = {"polls": 0, "failed": 0, "slowest": 0.0}
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_health(server.url, stop, health))
    results = {}
    for path, endpoint_bodies in bodies.items():
        await _load(server.url, path, endpoint_bodies, concurrency, concurrency)  # warm-up
        before = _batches(server.url, path)
        results[path] = await _load(server.url, path, endpoint_bodies, requests, concurrency)
        after = _batches(server.url, path)
        results[path]["mean_batch"] = (after["requests"] - before["requests"]) / max(after["calls"] - before["calls"], 1)
    stop.set()
    await poller
    return {"endpoints": results, "health": health}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vqa", required=True, help="a VQA run directory")
    parser.add_argument("--caption", required=True, help="a captioning run directory")
    parser.add_argument("--requests", type=int, default=256, help="requests per endpoint and mode (default 256)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--scenes", type=int, default=16, help="distinct scenes per endpoint")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        vqa, captions = _inputs(Path(folder), args.scenes)
    bodies = {
        "/v1/vqa": [{"files": {"image": ("scene.png", image, "image/png")}, "data": {"question": question}} for image, question in vqa],
        "/v1/caption": [{"files": {"image": ("scene.png", image, "image/png")}} for image in captions],
    }
    modes = {"batched (max 32, 10 ms)": 32, "one at a time": 1}
    table = {}
    for mode, max_batch in modes.items():
        server = Server(args.vqa, args.caption, max_batch, 10.0, args.device)
        try:
            table[mode] = asyncio.run(_run_mode(server, bodies, args.requests, args.concurrency))
        finally:
            server.stop()

    print(f"{args.requests} requests per endpoint at concurrency {args.concurrency}, loopback, multipart uploads\n")
    print("| mode | endpoint | p50 ms | p95 ms | requests/s | mean batch | 5xx | other non-200 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode, result in table.items():
        for path, r in result["endpoints"].items():
            print(f"| {mode} | {path} | {r['p50']:.1f} | {r['p95']:.1f} | {r['rps']:.1f} | {r['mean_batch']:.1f} | {r['5xx']} | {r['other']} |")
    print()
    for mode, result in table.items():
        h = result["health"]
        print(f"/healthz during {mode}: {h['polls']} polls, {h['failed']} failed, slowest {h['slowest'] * 1000:.1f} ms")
    (batched, one), paths = table.values(), bodies.keys()
    print()
    for path in paths:
        ratio = batched["endpoints"][path]["rps"] / one["endpoints"][path]["rps"]
        print(f"{path}: batching gives {ratio:.2f}x the throughput of one at a time")


if __name__ == "__main__":
    main()
