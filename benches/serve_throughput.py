#!/usr/bin/env python3
"""Aggregate generation speed of an OpenAI-compatible server under concurrent clients.

Runs the same load against `lutra serve` and `llama-server` (or any server with
`/v1/completions`): for each concurrency C, C client threads each send `--rounds` greedy
completion requests of `--tokens` tokens at once, with prompts no two clients share. Prints,
per C, the tokens generated per second of wall time summed over all clients (median over the
rounds), and each request's own rate.

    python3 benches/serve_throughput.py --url http://127.0.0.1:8080 --parallel 1,4,8 --tokens 64

Start the servers with as many sequences as the largest C (`lutra serve --parallel 8`,
`llama-server -np 8 -c <8 × per-sequence context>`) and the same thread count.
"""

import argparse
import json
import statistics
import threading
import time
import urllib.request

TOPICS = [
    "the history of the bicycle", "how bees make honey", "a city under the sea",
    "the life of a lighthouse keeper", "why the sky is blue", "a robot learning to paint",
    "the first winter on Mars", "a dragon who collects teapots", "how bread rises",
    "a journey along the Silk Road", "the secret life of octopuses", "a library that never closes",
    "the invention of the telescope", "a fox and a crow at dawn", "how rivers shape valleys",
    "a train that crosses the desert",
]


def complete(url, prompt, tokens, key):
    body = json.dumps({
        "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        # llama-server stops at end-of-generation unless told otherwise; lutra counts what it made.
        "ignore_eos": True,
    }).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/completions", data=body, headers=headers)
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        reply = json.load(resp)
    secs = time.perf_counter() - start
    return reply["usage"]["completion_tokens"], secs


def round_of(url, clients, tokens, key, round_no):
    results = [None] * clients
    errors = []

    def client(i):
        topic = TOPICS[(i + round_no * clients) % len(TOPICS)]
        prompt = f"Write a long essay about {topic}, round {round_no}, client {i}.\n\n"
        try:
            results[i] = complete(url, prompt, tokens, key)
        except Exception as e:  # reported below, the round fails
            errors.append(f"client {i}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit("; ".join(errors))
    generated = sum(r[0] for r in results)
    return generated / wall, [r[0] / r[1] for r in results]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--parallel", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    round_of(args.url, 1, 8, args.api_key, 99)  # warm-up
    for c in [int(x) for x in args.parallel.split(",")]:
        rates, per = [], []
        for r in range(args.rounds):
            agg, each = round_of(args.url, c, args.tokens, args.api_key, r)
            rates.append(agg)
            per.extend(each)
        print(f"{args.label} clients {c}: aggregate {statistics.median(rates):.1f} t/s "
              f"(rounds {', '.join(f'{x:.1f}' for x in rates)}); "
              f"per request {statistics.median(per):.1f} t/s", flush=True)


if __name__ == "__main__":
    main()
