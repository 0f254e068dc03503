"""Throughput of the HTTP judge (posttrain.rewards.judge) against a stub chat server with a fixed latency.

    .venv/bin/python benchmarks/judge_throughput.py [--requests 64] [--latency 0.05] [--concurrency 1 8]

The stub (http.server on 127.0.0.1, one thread per request) sleeps `latency` seconds and replies "Score: 7", so
the numbers measure the judge's own overhead and how well it overlaps requests, not a model. Prints requests per
second per `max_concurrency`, and each one's speed-up over the first.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from posttrain.rewards.judge import http_judge


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops simultaneous connects beyond it, and each waits 1 s to retry
    daemon_threads = True


def stub_server(latency: float) -> ThreadingHTTPServer:
    """A chat-completions server on a free port that answers every request "Score: 7" after `latency` s."""
    reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Score: 7"}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.05, help="the stub's seconds per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    args = ap.parse_args()
    server = stub_server(args.latency)
    url = f"http://127.0.0.1:{server.server_port}/v1"
    prompts = [f"What is {i} + {i}?" for i in range(args.requests)]
    completions = [str(2 * i) for i in range(args.requests)]
    rows = []
    for c in args.concurrency:
        judge = http_judge(url, "stub", max_concurrency=c, timeout_s=10)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            scores = judge(prompts, completions)
            times.append(time.perf_counter() - start)
            assert scores == [0.7] * args.requests, judge.stats()
        rows.append((c, sorted(times)[len(times) // 2]))
    server.shutdown()
    ideal = args.requests * args.latency
    print(f"{args.requests} requests, stub latency {args.latency * 1000:.0f} ms (serial lower bound {ideal:.2f} s), "
          f"median of {args.repeats}")
    print("| max_concurrency | seconds | requests/s | speed-up |")
    print("|---|---|---|---|")
    for c, t in rows:
        print(f"| {c} | {t:.3f} | {args.requests / t:.1f} | {rows[0][1] / t:.2f}x |")


if __name__ == "__main__":
    main()
