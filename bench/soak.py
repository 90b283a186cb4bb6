"""The caption service's soak (`python bench/serve.py --soak MINUTES`): mixed traffic at a fixed
concurrency for a bounded time against a `python -m paddle_caption.serve` child on 127.0.0.1.

Each of `concurrency` clients loops (closed loop) over a fixed rotation of request kinds: greedy
captions (JSON and multipart), greedy chat, beam search, sampling with n=2 and log-probs, a
streamed chat completion and a streamed caption (read to the end), bad requests (malformed JSON,
an undecodable image, an unknown field, max_tokens over the cap: each must be a 4xx), and a client
that disconnects after the first streamed chunk. Reported per minute: requests answered, answers
by status, p50/p99 latency of the served requests (2xx, read to the end; bad and abandoned
requests are not timed), and the server's RSS (from /proc at the end of the minute).

Bars for a 10-minute soak: no 5xx; RSS at the end within 5% of minute 2's; the last minute's p99
within 20% of minute 2's (minute 1 holds the warm-up: allocator and cache growth).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from pathlib import Path

RSS_TOLERANCE, P99_TOLERANCE = 0.05, 0.20
BAD_KINDS = ("bad_json", "bad_image", "unknown_field", "over_cap")
KINDS = ("greedy", "chat", "beam", "bad_json", "sampled_n2", "stream_chat", "multipart", "bad_image",
         "stream_caption", "disconnect", "greedy", "unknown_field", "chat", "over_cap", "stream_chat", "beam")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _chat(image: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}}]}], **kw}


async def one_request(client, kind: str, image: str, raw: bytes, max_new: int) -> tuple[int | str, bool]:
    """Send one request of `kind`; -> (status, or "disconnected"; whether it was served and timed)."""
    if kind == "greedy":
        r = await client.post("/v1/captions", json={"image": image, "max_new_tokens": max_new})
    elif kind == "multipart":
        r = await client.post("/v1/captions", files={"image": ("ad.jpg", raw, "image/jpeg")},
                              data={"max_new_tokens": str(max_new)})
    elif kind == "chat":
        r = await client.post("/v1/chat/completions", json=_chat(image, max_tokens=max_new))
    elif kind == "beam":
        r = await client.post("/v1/captions", json={"image": image, "max_new_tokens": max_new, "num_beams": 3})
    elif kind == "sampled_n2":
        r = await client.post("/v1/chat/completions", json=_chat(image, max_tokens=max_new, temperature=0.8,
                                                                 top_p=0.9, n=2, logprobs=True, top_logprobs=2))
    elif kind in ("stream_chat", "stream_caption", "disconnect"):
        url, body = (("/v1/captions", {"image": image, "max_new_tokens": max_new, "stream": True})
                     if kind == "stream_caption" else
                     ("/v1/chat/completions", _chat(image, max_tokens=max_new, stream=True,
                                                    stream_options={"include_usage": True})))
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, False
            async for line in r.aiter_lines():
                if kind == "disconnect" and '"content"' in line:
                    return "disconnected", False  # leaving the block closes the connection mid-stream
                if '"error"' in line[:20]:
                    return "stream_error", False
        return r.status_code, kind != "disconnect"
    elif kind == "bad_json":
        r = await client.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    elif kind == "bad_image":
        r = await client.post("/v1/captions", json={"image": "bm90IGFuIGltYWdl"})
    elif kind == "unknown_field":
        r = await client.post("/v1/captions", json={"image": image, "max_new_tokenz": 4})
    elif kind == "over_cap":
        r = await client.post("/v1/chat/completions", json=_chat(image, max_tokens=100_000))
    else:
        raise ValueError(kind)
    if kind in BAD_KINDS:
        return r.status_code, False
    return r.status_code, r.status_code == 200


async def soak(url: str, pid: int, payloads: list[str], raws: list[bytes], minutes: float, concurrency: int,
               max_new: int) -> dict:
    import httpx

    start = time.monotonic()
    end = start + minutes * 60
    n_minutes = int(-(-minutes // 1))
    per_minute = [{"statuses": collections.Counter(), "latencies": [], "rss_mb": None, "kinds": collections.Counter()}
                  for _ in range(n_minutes)]
    unexpected = collections.Counter()  # a bad request answered 2xx, or a good one not 2xx
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(worker: int, client):
        kinds = itertools.cycle(KINDS[worker % len(KINDS):] + KINDS[:worker % len(KINDS)])
        images = itertools.cycle(range(len(payloads)))
        while time.monotonic() < end:
            kind, k = next(kinds), next(images)
            t0 = time.monotonic()
            try:
                status, served = await one_request(client, kind, payloads[k], raws[k], max_new)
            except httpx.HTTPError as err:
                status, served = f"client error {type(err).__name__}", False
            t1 = time.monotonic()
            slot = per_minute[min(int((t1 - start) // 60), n_minutes - 1)]
            slot["statuses"][str(status)] += 1
            slot["kinds"][kind] += 1
            if served:
                slot["latencies"].append(t1 - t0)
            bad = kind in BAD_KINDS
            if (bad and not (isinstance(status, int) and 400 <= status < 500)) or \
                    (not bad and kind != "disconnect" and status != 200):
                unexpected[f"{kind}: {status}"] += 1

    async def sample_rss():
        for minute in range(n_minutes):
            await asyncio.sleep(max(0.0, min(start + 60 * (minute + 1), end) - 0.5 - time.monotonic()))
            per_minute[minute]["rss_mb"] = rss_mb(pid)

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(client_loop(w, client) for w in range(concurrency)))
        sampler.cancel()
    rows = []
    for minute, slot in enumerate(per_minute, 1):
        lat = slot["latencies"]
        rows.append({"minute": minute, "answered": sum(slot["statuses"].values()), "served_timed": len(lat),
                     "statuses": dict(sorted(slot["statuses"].items())), "kinds": dict(slot["kinds"]),
                     "p50_ms": None if not lat else 1e3 * percentile(lat, 50),
                     "p99_ms": None if not lat else 1e3 * percentile(lat, 99), "rss_mb": slot["rss_mb"]})
    return {"minutes": rows, "unexpected": dict(unexpected), "wall_seconds": round(time.monotonic() - start, 1)}


def bars(result: dict) -> dict:
    rows = result["minutes"]
    fives = sum(n for row in rows for status, n in row["statuses"].items() if status.startswith("5"))
    out = {"responses_5xx": fives, "no_5xx": fives == 0}
    if len(rows) >= 3:
        second, last = rows[1], rows[-1]
        if second["rss_mb"] and last["rss_mb"]:
            out["rss_end_vs_minute_2"] = last["rss_mb"] / second["rss_mb"] - 1
            out["rss_within_5pct"] = abs(out["rss_end_vs_minute_2"]) <= RSS_TOLERANCE
        if second["p99_ms"] and last["p99_ms"]:
            out["p99_last_vs_minute_2"] = last["p99_ms"] / second["p99_ms"] - 1
            out["p99_within_20pct"] = out["p99_last_vs_minute_2"] <= P99_TOLERANCE
    return out


def table(result: dict) -> str:
    lines = ["| minute | answered | served (timed) | answers by status | p50 ms | p99 ms | server RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for row in result["minutes"]:
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        fmt = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {row['minute']} | {row['answered']} | {row['served_timed']} | {statuses} | "
                     f"{fmt(row['p50_ms'])} | {fmt(row['p99_ms'])} | {fmt(row['rss_mb'])} |")
    return "\n".join(lines)


def run_soak(server_cls, model_dir: Path, model_note: str, minutes: float, concurrency: int, max_new: int,
             out: Path, write_report, machine_info, command: str) -> int:
    """Start the server, soak it, print the table and the bars, write the JSON report."""
    import base64
    import os

    from paddle_caption.data.synthetic import generate_split

    payloads = [row.image_b64 for row in generate_split("test", 32, seed=0)]
    raws = [base64.b64decode(p) for p in payloads]
    load_before = [round(x, 2) for x in os.getloadavg()]
    flags = ["--max_batch_size", "16", "--max_tokens_cap", str(max(max_new, 512)), "--max_queue", "256"]
    with server_cls(model_dir, *flags) as server:
        result = asyncio.run(soak(server.url, server.proc.pid, payloads, raws, minutes, concurrency, max_new))
    verdict = bars(result)
    report = {"command": command, "machine": machine_info(load_average_before=load_before), "model": model_note,
              "concurrency": concurrency, "max_new_tokens": max_new, "kinds": list(KINDS), **result, "bars": verdict}
    write_report(out, report)
    print(f"\nsoak: {minutes:g} min at concurrency {concurrency}, {model_note}, max_new_tokens {max_new}\n")
    print(table(result))
    print(f"\nunexpected answers: {result['unexpected'] or 'none'}")
    print("bars: " + json.dumps(verdict))
    print(f"wrote {out}")
    return 0
