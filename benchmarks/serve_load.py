"""Load test of `moon3 serve`: a real HTTP client against a server on 127.0.0.1, one item per
request, at concurrency 1-64, for titles and for photo + title; beside it, in the same run, the
in-process `sdk.Embedder` embedding the same items in batches of --max-batch. Then an overload
phase: far more concurrent requests than the queue holds, every answer counted (each request
must get exactly one answer: its own vector or a 429).

    nice -n 10 .venv/bin/python benchmarks/serve_load.py --engine moon3.engine \\
        --out docs/results/serve_load.json --plot docs/results/serve_load.png

Client, server and engine share this machine's cores: the client's own CPU time (the lean
`sdk.serve.client`, not a full HTTP library) and the server process's are reported per level,
in cores and in milliseconds per answered item, with the mean engine batch (from /metrics).
Bounded: each level stops after --requests or --seconds, whichever comes first.

The ratio to the in-process engine is measured in --pair-rounds rounds, each one the server at
concurrency --pair-concurrency (32) followed at once by the in-process `Embedder` on as many of
the same items, so both see the same load from whatever else runs on the machine; the median of
the rounds' ratios is reported, with every round. Without --threads the server gives ONNX Runtime
one core less than the machine has (one is left for its event loop; `sdk.serve.default_threads`),
while an `Embedder` left to itself takes them all: the in-process engine is then run both ways,
and the ratio is also reported against the faster of the two, so a thread count the in-process
engine could use as well flatters nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sdk.serve.client import Connection

try:  # the client checks every answer's id; orjson parses the 256-float answer in a few microseconds
    from orjson import loads as parse_json
except ImportError:
    parse_json = json.loads

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProc:
    def __init__(self, engine: str, *args: str):
        cmd = [sys.executable, "-m", "sdk", "serve", engine, "--port", "0", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in self.proc.stdout:
            m = re.search(r"listening on http://([\d.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                break
            print(line, end="", file=sys.stderr)
        else:
            raise SystemExit(f"moon3 serve did not start (exit {self.proc.wait()})")

    async def wait_ready(self, timeout: float = 300) -> None:
        t0 = time.monotonic()
        async with Connection(self.host, self.port) as c:
            while time.monotonic() - t0 < timeout:
                if (await c.get("/ready"))[0] == 200:
                    return
                await asyncio.sleep(0.2)
        raise SystemExit("moon3 serve never became ready")

    def stop(self) -> int:
        self.proc.terminate()
        rc = self.proc.wait(60)
        self.proc.stdout.close()
        return rc


def load_items(samples: Path) -> list[dict]:
    items = []
    for line in (samples / "items.jsonl").read_text().splitlines():
        rec = json.loads(line)
        items.append({"id": rec["id"], "title": rec["title"],
                      "image": (samples / rec["image"]).read_bytes() if rec.get("image") else None})
    return [it for it in items if it["image"] is not None]


def request_body(it: dict, workload: str) -> bytes:
    item = {"id": it["id"], "title": it["title"]}
    if workload == "photo+title":
        item["image"] = it["b64"]
    return json.dumps({"items": [item]}).encode()


async def run_level(srv: ServerProc, bodies: list[tuple[int, bytes]], concurrency: int, seconds: float) -> dict:
    """Send the bodies (one item each) from `concurrency` connections; stop early after `seconds`."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    answers: dict[int, int] = {}
    wrong = 0
    it = iter(bodies)
    deadline = time.perf_counter() + seconds

    async def worker():
        nonlocal wrong
        async with Connection(srv.host, srv.port, timeout=120) as c:
            for rid, body in it:
                if time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                status, _, data = await c.post("/v1/embed", body)
                lat.append(time.perf_counter() - t)
                codes[status] = codes.get(status, 0) + 1
                if status == 200:
                    got = parse_json(data)["data"][0]["id"]
                    answers[got] = answers.get(got, 0) + 1
                    wrong += got != rid

    b0 = await batch_counts(srv)
    c0, s0, t0 = time.process_time(), cpu_seconds(srv.proc.pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    client_cpu, server_cpu = time.process_time() - c0, cpu_seconds(srv.proc.pid) - s0
    b1 = await batch_counts(srv)
    ok = codes.get(200, 0)
    ms = np.array(lat) * 1000
    return {"concurrency": concurrency, "requests": len(lat), "ok": ok, "codes": {str(k): v for k, v in codes.items()},
            "wrong_answers": wrong, "seconds": round(wall, 3), "items_per_s": round(ok / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "client_cpu_cores": round(client_cpu / wall, 3), "server_cpu_cores": round(server_cpu / wall, 3),
            "client_cpu_ms_per_item": round(client_cpu / max(ok, 1) * 1000, 3),
            "server_cpu_ms_per_item": round(server_cpu / max(ok, 1) * 1000, 3),
            "batches": int(b1[1] - b0[1]), "mean_batch": round((b1[0] - b0[0]) / max(b1[1] - b0[1], 1), 2)}


async def batch_counts(srv: ServerProc) -> tuple[float, float]:
    """(items, batches) the engine has run so far, from the server's /metrics."""
    async with Connection(srv.host, srv.port) as c:
        status, _, body = await c.get("/metrics")
    got = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in ("moon3_batch_size_sum", "moon3_batch_size_count"):
            got[name] = float(value)
    return got.get("moon3_batch_size_sum", 0.0), got.get("moon3_batch_size_count", 0.0)


def in_process(engine: str, items: list[dict], workload: str, batch: int, threads: int | None, n: int) -> dict:
    """The same items through `sdk.Embedder` in batches of `batch` (what the server's engine does
    when its batches are full), best of 2 passes; its CPU time (all its threads) per item too."""
    from sdk.embedder import Embedder

    emb = Embedder(engine, threads=threads)
    sel = [items[k % len(items)] for k in range(n)]
    images = [it["image"] for it in sel] if workload == "photo+title" else None
    texts = [it["title"] for it in sel]
    emb.embed_batch(images[:batch] if images else None, texts[:batch], batch_size=batch)  # warm-up
    best, cpu = 0.0, 0.0
    for _ in range(2):
        c0, t0 = time.process_time(), time.perf_counter()
        for s in range(0, n, batch):
            emb.embed_batch(images[s : s + batch] if images else None, texts[s : s + batch], batch_size=batch)
        rate = n / (time.perf_counter() - t0)
        if rate > best:
            best, cpu = rate, time.process_time() - c0
    emb.close()
    return {"items": n, "batch": batch, "threads": threads, "items_per_s": round(best, 2),
            "cpu_ms_per_item": round(cpu / n * 1000, 3)}


async def overload(srv: ServerProc, items: list[dict], n: int, concurrency: int) -> dict:
    """n one-title requests from `concurrency` connections at once against a small queue: count
    every answer. Each request must get exactly one: 200 with its own id, or 429."""
    answers: dict[int, int] = {}
    codes: dict[int, int] = {}
    lost: list[str] = []
    mismatched = 0
    retry_after: set[str] = set()
    it = iter(range(n))

    async def worker():
        nonlocal mismatched
        async with Connection(srv.host, srv.port, timeout=120) as c:
            for rid in it:
                body = json.dumps({"items": [{"id": rid, "title": items[rid % len(items)]["title"]}]}).encode()
                try:
                    status, headers, data = await c.post("/v1/embed", body)
                except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
                    lost.append(f"{rid}: {type(exc).__name__}: {exc}")
                    continue
                codes[status] = codes.get(status, 0) + 1
                if status == 200:
                    got = parse_json(data)["data"][0]["id"]
                    mismatched += got != rid
                    answers[got] = answers.get(got, 0) + 1
                elif status == 429:
                    retry_after.add(headers.get("retry-after", "missing"))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"requests": n, "concurrency": concurrency, "seconds": round(time.perf_counter() - t0, 2),
            "codes": {str(k): v for k, v in sorted(codes.items())}, "answered": sum(codes.values()),
            "lost": len(lost), "lost_examples": lost[:5], "answered_twice": sum(v > 1 for v in answers.values()),
            "wrong_id": mismatched, "retry_after_values": sorted(retry_after)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5.6))
    for (wl, levels), color in zip(result["levels"].items(), ("tab:blue", "tab:orange")):
        cs = [lv["concurrency"] for lv in levels]
        ax1.plot(cs, [lv["items_per_s"] for lv in levels], "o-", color=color, label=f"server, {wl}")
        for key, ls in (("in_process", "--"), ("in_process_server_threads", ":")):
            if wl in result.get(key, {}):
                base = result[key][wl]
                ax1.axhline(base["items_per_s"], color=color, ls=ls,
                            label=f"in-process, batch {result['config']['max_batch']}, "
                                  f"{base['threads'] or 'ORT default'} thread{'' if base['threads'] == 1 else 's'}, {wl}")
        ax2.plot(cs, [lv["p50_ms"] for lv in levels], "o-", color=color, label=f"p50, {wl}")
        ax2.plot(cs, [lv["p99_ms"] for lv in levels], "s:", color=color, label=f"p99, {wl}")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (one item per request)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("items / s")
    ax1.set_title("throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("latency")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.suptitle(f"moon3 serve, {result['engine']['name']} ({result['engine']['precision']}), "
                 f"{result['machine']['cores']} cores shared by client, server and engine", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="moon3.engine")
    ap.add_argument("--samples", default=str(ROOT / "data/samples"))
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads, server and in-process alike")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--workloads", default="titles,photo+title")
    ap.add_argument("--requests", type=int, default=320, help="most requests per level")
    ap.add_argument("--seconds", type=float, default=15.0, help="most seconds per level")
    ap.add_argument("--pair-rounds", type=int, default=3, help="rounds of server vs in-process, alternated")
    ap.add_argument("--pair-concurrency", type=int, default=32)
    ap.add_argument("--overload-requests", type=int, default=3000)
    ap.add_argument("--overload-concurrency", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "docs/results/serve_load.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/results/serve_load.png"))
    args = ap.parse_args()

    from sdk.engine import EngineFile
    from sdk.serve import default_threads

    manifest = EngineFile.read(args.engine).manifest
    items = load_items(Path(args.samples))
    for it in items:
        it["b64"] = base64.b64encode(it["image"]).decode()
    threads = ["--threads", str(args.threads)] if args.threads else []
    server_threads = args.threads or default_threads()  # what the server gives ONNX Runtime
    workloads = args.workloads.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    result: dict = {
        "command": "nice -n 10 .venv/bin/python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "engine": {"name": Path(args.engine).name, "precision": manifest["embedder"].get("precision"),
                   "layout": manifest["embedder"].get("layout", "single")},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "load_avg_at_start": list(os.getloadavg())},
        "config": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
                   "server_engine_threads": server_threads,
                   "requests_per_level": args.requests, "seconds_per_level": args.seconds,
                   "pair_rounds": args.pair_rounds, "pair_concurrency": args.pair_concurrency,
                   "items": f"{len(items)} products of {os.path.relpath(args.samples, ROOT)} with a photo, cycled"},
        "levels": {}, "in_process": {}, "in_process_server_threads": {}, "paired": {},
    }
    configs = [("in_process", args.threads)] + ([("in_process_server_threads", server_threads)]
                                                if args.threads is None else [])
    srv = ServerProc(args.engine, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                     "--queue", "1024", *threads)
    try:
        asyncio.run(srv.wait_ready())
        for wl in workloads:
            bodies = [(items[k % len(items)]["id"], request_body(items[k % len(items)], wl))
                      for k in range(args.requests)]
            result["levels"][wl] = []
            for c in levels:
                lv = asyncio.run(run_level(srv, bodies, c, args.seconds))
                result["levels"][wl].append(lv)
                print(f"{wl:12s} c={c:3d}: {lv['items_per_s']:8.1f} items/s  p50 {lv['p50_ms']:7.1f} ms  "
                      f"p99 {lv['p99_ms']:7.1f} ms  client {lv['client_cpu_cores']:.2f} / server "
                      f"{lv['server_cpu_cores']:.2f} cores  {lv['codes']}", flush=True)
            # the ratio: the server at pair-concurrency and, next to it, the in-process engine on as
            # many of the same items (the server idles meanwhile), round after round; odd rounds run
            # the in-process engine first, so neither side always goes first
            rounds = []
            at_pair = [lv["ok"] for lv in result["levels"][wl] if lv["concurrency"] == args.pair_concurrency]
            n = max(min(args.requests, at_pair[0] if at_pair else args.requests), args.max_batch)  # items in process
            for r in range(args.pair_rounds):
                rnd = {}
                for step in (("server", *configs) if r % 2 == 0 else (*configs, "server")):
                    if step == "server":
                        rnd["server"] = lv = asyncio.run(run_level(srv, bodies, args.pair_concurrency, args.seconds))
                    else:
                        key, t = step
                        rnd[key] = in_process(args.engine, items, wl, args.max_batch, t, n)
                for key, _ in configs:
                    rnd[f"ratio_{key}"] = round(lv["items_per_s"] / rnd[key]["items_per_s"], 3)
                rnd["ratio_best"] = round(lv["items_per_s"] / max(rnd[k]["items_per_s"] for k, _ in configs), 3)
                rounds.append(rnd)
                print(f"{wl:12s} round {r}: server c={args.pair_concurrency} {lv['items_per_s']:.1f} items/s "
                      f"({lv['server_cpu_ms_per_item']:.2f} ms CPU/item, batch {lv['mean_batch']}); "
                      + "; ".join(f"in-process threads {t or 'ORT default'} {rnd[k]['items_per_s']:.1f} items/s "
                                  f"({rnd[k]['cpu_ms_per_item']:.2f} ms CPU/item)" for k, t in configs)
                      + f"; ratio to the faster {rnd['ratio_best']}", flush=True)
            med = {k: float(np.median([rnd[k] for rnd in rounds]))
                   for k in ["ratio_best"] + [f"ratio_{key}" for key, _ in configs]}
            result["paired"][wl] = {"rounds": rounds, **{f"median_{k}": round(v, 3) for k, v in med.items()},
                                    "median_server_items_per_s": round(float(np.median(
                                        [rnd["server"]["items_per_s"] for rnd in rounds])), 2),
                                    "median_server_cpu_ms_per_item": round(float(np.median(
                                        [rnd["server"]["server_cpu_ms_per_item"] for rnd in rounds])), 3)}
            for key, t in configs:  # the baselines the plot and the table show: medians of the rounds
                result[key][wl] = {"batch": args.max_batch, "threads": t, "items_per_s": round(float(np.median(
                    [rnd[key]["items_per_s"] for rnd in rounds])), 2), "cpu_ms_per_item": round(float(np.median(
                        [rnd[key]["cpu_ms_per_item"] for rnd in rounds])), 3)}
    finally:
        result["server_exit"] = srv.stop()
    # server / in-process at pair-concurrency, medians of the rounds: against the baseline at
    # --threads (ORT's default when not given), against the in-process engine at the server's thread
    # count, and against the faster of the two (the one to quote)
    result["server_vs_in_process_at_32"] = {wl: p["median_ratio_in_process"] for wl, p in result["paired"].items()}
    result["server_vs_in_process_server_threads_at_32"] = {
        wl: p.get("median_ratio_in_process_server_threads", p["median_ratio_in_process"])
        for wl, p in result["paired"].items()}
    result["server_vs_best_in_process_at_32"] = {wl: p["median_ratio_best"] for wl, p in result["paired"].items()}
    ratio, same, best = (result[k] for k in ("server_vs_in_process_at_32", "server_vs_in_process_server_threads_at_32",
                                             "server_vs_best_in_process_at_32"))

    queue = 2 * args.max_batch
    srv = ServerProc(args.engine, "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                     "--queue", str(queue), "--max-items", str(queue), *threads)
    try:
        asyncio.run(srv.wait_ready())
        result["overload"] = asyncio.run(overload(srv, items, args.overload_requests, args.overload_concurrency))
        result["overload"]["queue"] = queue
        print(f"overload: {result['overload']}", flush=True)
    finally:
        result["overload"]["server_exit"] = srv.stop()
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.plot))
    print(f"wrote {args.out} and {args.plot}; server / in-process at concurrency 32: {ratio} (ORT default "
          f"threads), {same} (the server's {server_threads}), {best} (the faster of the two)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
