"""Serving throughput: `kiln serve` with continuous batching vs the same server one request at a time,
and one client on the server vs the bare engine.

First, one client's decode tokens/s two ways, greedy, the same prompt, and their ratio: the bare
engine in this process (one `Batch` row loaded and stepped on the main thread, as `kiln generate`
decodes), and one streaming client on `kiln serve` (tokens after the first over the time from the
first to the last, as the client receives them: the HTTP event loop and the client itself share the
machine's cores with decoding). Both processes keep one OpenMP thread pool (the server loads, steps
and scores on its engine thread), so both decode with libgomp's workers spinning between ops
(`kiln.serve.scheduler`). They run in turns of `--block` requests each, `--rounds` turns, so the
host's drift falls on both. The first request of a turn is the first after that process sat idle
(decoding slower, the host's cores waking): it is reported apart, and the medians are of the rest,
each a request right after another.
Starts `kiln serve` twice on 127.0.0.1 (`max_batch=32`, then `max_batch=1`: each request waits for
the one before to finish), and drives each with 1, 8 and 32 concurrent streaming clients, the same
prompts and greedy settings (so both do the same work). Prints requests/s, p50/p99 latency and
time to first token, and the continuous/one-at-a-time ratio of requests/s.

    python -P bench/serve.py                         # a fresh `small` run (as bench/generate.py makes)
    python -P bench/serve.py --run runs/quickstart --requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self", "for i in range(", "# parse the",
           "def main():\n    args =", "with open(path) as f:", "try:\n    import json"]


def start_server(run: Path, max_batch: int, device: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "kiln", "serve", f"out={run}", "port=0", f"max_batch={max_batch}",
           f"device={device}", "max_queue=1024", "max_streams_per_key=1024"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if " on http" not in line:
        p.kill()
        raise SystemExit(f"kiln serve did not start: {line!r}")
    return p, line.split(" on ")[1].split("/v1")[0]


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, latency, tokens) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"] and event["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return ttft if ttft is not None else latency, latency, tokens


def drive(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    todo = iter(range(requests))

    def worker() -> None:
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = one_request(c, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in results)
    ttft = sorted(r[0] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"rps": len(results) / wall, "p50": statistics.median(lat), "p99": pct(lat, 0.99),
            "ttft50": statistics.median(ttft), "ttft99": pct(ttft, 0.99),
            "tokens_per_s": sum(r[2] for r in results) / wall}


def served_decode(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> float:
    """Decode tokens/s of one streamed completion, as the client receives it: the tokens after the
    first over the time after the first (`one_request`'s figures)."""
    ttft, latency, tokens = one_request(client, url, model, prompt, max_tokens)
    return (tokens - 1) / (latency - ttft)


def bare_decode(engine, batch, prompt: str, max_tokens: int) -> float:
    """Decode tokens/s of the bare engine: one sequence in `batch`, stepped on this (the main) thread."""
    from kiln.infer.engine import SamplingParams, Sequence

    seq = Sequence(engine.encode_prompt(prompt), SamplingParams(max_new_tokens=max_tokens, temperature=0.0),
                   engine.tokenizer)
    seq.submitted = time.perf_counter()
    batch.add([seq])
    while batch.running:
        batch.step()
    return seq.decode_tokens_per_s


def one_client_vs_bare(run: Path, url: str, model: str, device: str, max_tokens: int, rounds: int,
                       block: int) -> None:
    """The server and the bare engine in turns, `block` requests each per turn; the first of each
    turn follows an idle spell of its process and is reported apart, out of the medians."""
    from kiln.infer.generate import Engine

    engine = Engine.from_run(run, device)
    batch = engine.new_batch(1)
    prompt = PROMPTS[0]
    max_tokens = min(max_tokens, engine.context - len(engine.encode_prompt(prompt)) - 1)
    served, bare, served_first, bare_first = [], [], [], []
    with httpx.Client(timeout=600) as c:
        served_decode(c, url, model, prompt, max_tokens)  # warm up both
        bare_decode(engine, batch, prompt, max_tokens)
        for _ in range(rounds):  # in turns, so the machine's drift falls on both
            for first, rest, fn in ((served_first, served, lambda: served_decode(c, url, model, prompt, max_tokens)),
                                    (bare_first, bare, lambda: bare_decode(engine, batch, prompt, max_tokens))):
                first.append(fn())
                rest += [fn() for _ in range(block - 1)]
    s, b = statistics.median(served), statistics.median(bare)
    sf, bf = statistics.median(served_first), statistics.median(bare_first)
    print(f"one client, {max_tokens} tokens, median of {rounds} turns of {block - 1} after the first: bare engine "
          f"{b:.0f} decode tokens/s; the server over HTTP {s:.0f} ({s / b:.2f}x the bare engine); the first "
          f"request after each switch: bare {bf:.0f}, server {sf:.0f} ({sf / bf:.2f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a kiln run with a checkpoint (default: make one of --preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per measurement (at least the clients)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--single-tokens", type=int, default=128, help="tokens per request, one client vs bare engine")
    ap.add_argument("--rounds", type=int, default=7, help="turns of one client vs bare engine")
    ap.add_argument("--block", type=int, default=4, help="requests per turn (at least 2: the first is reported apart)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            run = Path(args.run)
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from generate import make_run

            run = make_run(Path(tmp), args.preset)
        model = run.resolve().name
        table: dict[tuple[str, int], dict] = {}
        for mode, rows in (("continuous", 32), ("one-at-a-time", 1)):
            p, url = start_server(run, rows, args.device)
            try:
                if mode == "continuous":
                    one_client_vs_bare(run, url, model, args.device, args.single_tokens, args.rounds, max(2, args.block))
                drive(url, model, 1, 2, args.max_tokens)  # warm up
                for c in (int(x) for x in args.clients.split(",")):
                    table[mode, c] = m = drive(url, model, c, max(args.requests, c), args.max_tokens)
                    print(f"{mode:>14} {c:>3} clients: {m['rps']:6.2f} req/s, {m['tokens_per_s']:7.1f} tokens/s, "
                          f"latency p50 {m['p50']:.2f} s p99 {m['p99']:.2f} s, "
                          f"TTFT p50 {m['ttft50']:.3f} s p99 {m['ttft99']:.3f} s", flush=True)
            finally:
                p.terminate()
                p.wait(60)
        for c in (int(x) for x in args.clients.split(",")):
            ratio = table["continuous", c]["rps"] / table["one-at-a-time", c]["rps"]
            print(f"{c:>3} clients: continuous batching {ratio:.2f}x the requests/s of one at a time")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
