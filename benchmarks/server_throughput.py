#!/usr/bin/env python3
"""Aggregate throughput of llama-server with C concurrent clients: Self-Extend against vanilla, same run.

    python benchmarks/server_throughput.py MODEL --ctx-per-slot 16384 --prompt 16000 --gen 32 --clients 1,2,4,8

For each client count C, one llama-server with C slots of --ctx-per-slot tokens each is started with
Self-Extend (G and W planned for that context by selfext, or --ga-n/--ga-w) and one with the same flags
and vanilla attention (its slot cap lifted with --override-kv when the context exceeds the trained one: the
speed is what is measured, not the answers). The two alternate, so drift on a shared machine hits both. C
clients then each send one request of --prompt tokens (distinct texts: no shared prefix) and generate --gen
tokens (ignore_eos). Printed per C: wall time, aggregate tokens/s (prompt + generated over the wall time),
prefill and decode tokens/s as llama-server reports them summed over clients, and the ratio Self-Extend /
vanilla. One JSON line per run with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from selfext_cpp import llama_server
from selfext_cpp.models import inspect

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def prompt_text(n_tokens: int, seed: int) -> str:
    # ~4.6 tokens per filler sentence for SmolLM2; a numbered prefix keeps every client's text its own
    rng = random.Random(seed)
    head = " ".join(str(rng.randrange(10**6)) for _ in range(16))
    words = FILLER.split(" ")
    body = " ".join(words[i % len(words)] for i in range(int(n_tokens * 0.8)))
    return head + " " + body


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=7200) as resp:
        return json.loads(resp.read())


def tokens(url: str, text: str) -> int:
    req = urllib.request.Request(url + "/tokenize", data=json.dumps({"content": text}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as resp:
        return len(json.loads(resp.read())["tokens"])


def run(cfg: llama_server.Config, clients: int, n_prompt: int, n_gen: int, seed: int) -> dict:
    with llama_server.start(cfg, port=0) as srv:
        # trim each text to n_prompt tokens (+-1 for the BOS) so both engines read the same counts
        texts = []
        for c in range(clients):
            t = prompt_text(n_prompt, seed + c)
            while tokens(srv.url, t) > n_prompt:
                t = t[: int(len(t) * 0.97)]
            texts.append(t)
        body = {"n_predict": n_gen, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            res = list(pool.map(lambda t: post(srv.url, {**body, "prompt": t}), texts))
        wall = time.perf_counter() - t0
    n_p = sum(r["timings"]["prompt_n"] for r in res)
    n_g = sum(r["timings"]["predicted_n"] for r in res)
    return {
        "self_extend": cfg.ga_n > 1, "ga_n": cfg.ga_n, "ga_w": cfg.ga_w, "clients": clients,
        "ctx_per_slot": cfg.n_ctx_slot, "prompt_tokens": n_p, "gen_tokens": n_g, "wall_s": round(wall, 2),
        "tok_s": round((n_p + n_g) / wall, 2),
        "prefill_tok_s_per_client": round(sum(r["timings"]["prompt_per_second"] for r in res) / clients, 2),
        "decode_tok_s_per_client": round(sum(r["timings"]["predicted_per_second"] for r in res) / clients, 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--ctx-per-slot", type=int, default=16384)
    ap.add_argument("--prompt", type=int, default=16000, help="prompt tokens per client")
    ap.add_argument("--gen", type=int, default=32, help="generated tokens per client")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--ga-n", type=int, default=1, help="default: planned for --ctx-per-slot")
    ap.add_argument("--ga-w", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    meta = inspect(a.model)
    rows = []
    for clients in [int(c) for c in a.clients.split(",")]:
        if a.ga_n > 1:
            se = llama_server.config(a.model, parallel=clients, ga_n=a.ga_n, ga_w=a.ga_w, n_ctx=a.ctx_per_slot,
                                     threads=a.threads, n_gpu_layers=a.n_gpu_layers)
        else:
            se = llama_server.config(a.model, parallel=clients, auto_max_ctx=a.ctx_per_slot, threads=a.threads,
                                     n_gpu_layers=a.n_gpu_layers)
        extra = ()
        if a.ctx_per_slot > meta.n_ctx_train:  # vanilla: lift the slot cap (upstream caps at the trained context)
            extra = ("--override-kv", f"{meta.architecture}.context_length=int:{a.ctx_per_slot}")
        vanilla = dataclasses.replace(se, ga_n=1, ga_w=0, extra=extra)
        pair = {}
        for cfg in (se, vanilla) if clients % 2 else (vanilla, se):  # alternate which goes first
            r = run(cfg, clients, a.prompt, a.gen, a.seed)
            pair[r["self_extend"]] = r
            rows.append(r)
            if a.json:
                print(json.dumps(r), flush=True)
        if not a.json:
            s, v = pair[True], pair[False]
            print(f"clients {clients}: Self-Extend (G={s['ga_n']} W={s['ga_w']}) {s['tok_s']:8.1f} tok/s "
                  f"({s['wall_s']:.1f} s), vanilla {v['tok_s']:8.1f} tok/s ({v['wall_s']:.1f} s), "
                  f"ratio {s['tok_s'] / v['tok_s']:.3f}; per client prefill {s['prefill_tok_s_per_client']:.1f} "
                  f"vs {v['prefill_tok_s_per_client']:.1f}, decode {s['decode_tok_s_per_client']:.2f} vs "
                  f"{v['decode_tok_s_per_client']:.2f} tok/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
