"""Benchmark: `hashrec serve` under a bounded load on loopback, with and without micro-batching.

    flock /tmp/hashrec-heavy.lock python benchmarks/bench_serve.py
    python benchmarks/bench_serve.py --quick                 # fewer requests
    python benchmarks/bench_serve.py --checkpoint runs/demo/checkpoint.safetensors

Two servers run as separate processes (`hashrec serve`, one with the default batching, one with
`--max-batch 1`), started by this script on 127.0.0.1. A load generator in this process sends a
fixed number of `POST /rank` requests (S = 32 history events, 100 or 1000 candidates) at
concurrency 1, 8 and 32 over keep-alive connections (a minimal HTTP/1.1 client on asyncio, so
the client's own overhead stays small), the two servers taking turns. Each row reports
requests/s, p50 and p99 latency (request written -> response read) and failures (anything but
a 200, or a connection error), and the server's CPU time per request (user + system, from
/proc), which a busy shared machine disturbs far less than the latencies.

The model is the demo's architecture (D = 32, 2 layers, 2 query heads, 1 KV head, k = 2 hashes,
tables at 25% of the shipped KuaiRand sample's distinct IDs) with random weights unless
--checkpoint is given: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def demo_checkpoint(path: Path) -> None:
    import torch

    from hashrec import PhoenixRanker, RankerConfig, TransformerConfig
    from hashrec.data import load_kuairand
    from hashrec.datasets import kuairand_sample_dir
    from hashrec.evaluation.experiment import hashed_config
    from hashrec.training.checkpoint import save_checkpoint

    log = load_kuairand(kuairand_sample_dir())
    torch.manual_seed(0)
    cfg = RankerConfig(
        hash=hashed_config(log, 0.25, 2),
        transformer=TransformerConfig(
            dim=32, num_layers=2, num_q_heads=2, num_kv_heads=1, widening_factor=2.0
        ),
        actions=log.actions,
        continuous_actions=log.continuous_actions,
    )
    save_checkpoint(path, PhoenixRanker(cfg), extra={"examples": {"history_len": 32}})


def payloads(actions: list[str], S: int, C: int, n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        req = {
            "user_id": int(rng.integers(1, 30_000)),
            "history": [
                {
                    "post_id": int(rng.integers(1, 10_000)),
                    "author_id": int(rng.integers(1, 10_000)),
                    "actions": [a for a in actions if rng.random() < 0.2],
                    "surface": int(rng.integers(0, 4)),
                }
                for _ in range(S)
            ],
            "candidates": [
                {
                    "post_id": int(rng.integers(1, 10_000)),
                    "author_id": int(rng.integers(1, 10_000)),
                    "surface": int(rng.integers(0, 4)),
                }
                for _ in range(C)
            ],
        }
        out.append(json.dumps(req).encode())
    return out


async def _post(reader, writer, path: str, body: bytes) -> int:
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    await writer.drain()
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def load(port: int, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], int]:
    """Each body once over ``concurrency`` keep-alive connections: (wall, latencies, fails)."""
    next_i, latencies, failures = 0, [], 0

    async def worker() -> None:
        nonlocal next_i, failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_i < len(bodies):
                body = bodies[next_i]
                next_i += 1
                t0 = time.perf_counter()
                try:
                    status = await _post(reader, writer, "/rank", body)
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    failures += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                latencies.append(time.perf_counter() - t0)
                failures += status != 200
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies, failures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, extra: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "hashrec", "serve", "--ranker", str(ckpt), "--port", str(port),
           "--threads", str(threads), *extra]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            ok = b" 200 " in await reader.readline()
            writer.close()
            if ok:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="ranker checkpoint (default: demo architecture)")
    p.add_argument("--quick", action="store_true", help="a quarter of the requests")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the request counts")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--history", type=int, default=32)
    args = p.parse_args()
    counts = {100: 400, 1000: 160}  # requests per row, per candidate count
    scale = args.scale * (0.25 if args.quick else 1.0)
    counts = {c: max(8, int(n * scale)) for c, n in counts.items()}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "demo.safetensors"
        if not args.checkpoint:
            demo_checkpoint(ckpt)
        from hashrec.training.checkpoint import read_checkpoint_metadata

        actions = read_checkpoint_metadata(ckpt)["model_config"]["actions"]
        servers = {"on": [], "off": ["--max-batch", "1"]}
        ports = {name: free_port() for name in servers}
        procs = {n: start_server(ckpt, ports[n], servers[n], args.threads) for n in servers}
        try:
            asyncio.run(run_all(args, counts, actions, ports, procs))
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=60)


async def run_all(args, counts, actions, ports, procs) -> None:
    for name in ports:
        await wait_ready(ports[name], procs[name])
    print(f"hashrec serve on 127.0.0.1, S = {args.history}, {args.threads} torch thread(s) per "
          f"server, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          "batching on = --max-batch 32 --max-wait-ms 2")  # fmt: skip
    print()
    print("| candidates | concurrency | batching | requests | failures | req/s | p50 ms | p99 ms "
          "| server CPU ms/req | req/s on/off |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for C, n in counts.items():
        bodies = payloads(actions, args.history, C, n, seed=C)
        warm = payloads(actions, args.history, C, 16, seed=C + 1)
        for conc in (1, 8, 32):
            res = {}
            for name in ("on", "off"):  # the two servers take turns
                await load(ports[name], warm, min(conc, 8))
                cpu0 = cpu_seconds(procs[name].pid)
                wall, lat, fails = await load(ports[name], bodies, conc)
                cpu = (cpu_seconds(procs[name].pid) - cpu0) / len(bodies) * 1000
                ms = np.array(lat) * 1000
                res[name] = (len(bodies) / wall, np.percentile(ms, 50), np.percentile(ms, 99),
                             fails, cpu)  # fmt: skip
            for name in ("on", "off"):
                rps, p50, p99, fails, cpu = res[name]
                ratio = f"{res['on'][0] / res['off'][0]:.2f}x" if name == "on" else ""
                print(f"| {C} | {conc} | {name} | {n} | {fails} | {rps:,.0f} | {p50:.1f} | "
                      f"{p99:.1f} | {cpu:.2f} | {ratio} |", flush=True)  # fmt: skip
            summary[(C, conc)] = res
    on1, on32, off32 = summary[(100, 1)]["on"], summary[(100, 32)]["on"], summary[(100, 32)]["off"]
    print()
    print(
        f"targets, 100 candidates: p99 at concurrency 1 = {on1[2]:.1f} ms (target < 20 ms); "
        f"batching at concurrency 32 = {on32[0] / off32[0]:.2f}x req/s (target >= 2x); "
        f"failures = {sum(r[3] for res in summary.values() for r in res.values())}"
    )


if __name__ == "__main__":
    main()
