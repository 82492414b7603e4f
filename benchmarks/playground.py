"""Steered generation through the playground server against the direct library call, same setting.

On the embedded SmolLM2-135M-Instruct: a sentiment vector (mean difference of the built-in pairs at one
layer), a prompt, greedy decoding of N tokens at +0.1 of the residual norm. Each round times

  direct:  `with vector.apply(...): steerlab.evaluate.generate(lm, [prompt], ...)` in this process;
  server:  POST /api/generate (steered side only, no shading) read as an event stream, timed to the
           steered side's "done" event, through a real HTTP connection to the server on 127.0.0.1 (the
           stream is read to its end before the next call: the model is shared);
  page:    the request the page sends (unsteered and steered, then the shading passes), for reference
           against two direct generations.

Rounds alternate direct and server calls so that load on the machine affects both alike; the figures
are medians. Both paths must produce the same tokens (checked). Optionally writes a screenshot of the
page (headless Chromium). Ends with one JSON line.

    python benchmarks/playground.py [--tokens 48] [--rounds 7] [--screenshot docs/img/playground.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

import steerlab
from steerlab.data import load_builtin
from steerlab.evaluate import generate
from steerlab.playground import Playground, running
from steerlab.steering import extract_mean_difference

PROMPT = "My weekend at the seaside was"
LAYER = 16
FRACTION = 0.1


def post_stream(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        url + "api/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    events = []
    with urllib.request.urlopen(request) as response:
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                events.append(event)
                if event.get("error"):
                    raise RuntimeError(event["error"])
                if event.get("done") and event.get("side") == "steered":
                    event["at"] = time.perf_counter()
    return events


def screenshot(url: str, vector_id: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        page.select_option("#vector", vector_id)
        page.select_option("#layer", str(LAYER))
        page.fill("#fraction", "0.15")
        page.fill("#prompt", "The coffee at the station is")
        page.fill("#max-tokens", "40")
        page.click("#generate")
        page.wait_for_selector("#out-steered[data-shaded=true]", timeout=300_000)
        page.click("#metrics")
        page.wait_for_selector("#metrics-table:not([hidden])", timeout=300_000)
        page.screenshot(path=str(path), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--screenshot", type=Path, default=None, help="also save a screenshot of the page here"
    )
    args = parser.parse_args()

    lm = steerlab.load_model()
    started = time.perf_counter()
    vector = extract_mean_difference(lm, load_builtin("sentiment"), layers=[LAYER], progress=False)
    print(f"extracted the sentiment vector at layer {LAYER} in {time.perf_counter() - started:.1f} s")
    multiplier = vector.multiplier_for_fraction(LAYER, FRACTION)
    with tempfile.TemporaryDirectory() as folder:
        vector.save(Path(folder) / "sentiment")
        playground = Playground(lm, vectors_dir=folder)
        (vector_id,) = playground.vectors
        setting = {"vector": vector_id, "layer": LAYER, "fraction": FRACTION, "positions": "all"}
        body = {"setting": setting, "prompt": PROMPT, "chat": False, "max_new_tokens": args.tokens}
        direct_s, server_s, page_s = [], [], []
        with running(playground) as url:
            post_stream(url, {**body, "sides": ["steered"], "shading": False})  # warm-up
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                with vector.apply(lm, layer=LAYER, multiplier=multiplier):
                    (direct,) = generate(lm, [PROMPT], chat=False, max_new_tokens=args.tokens)
                t1 = time.perf_counter()
                events = post_stream(url, {**body, "sides": ["steered"], "shading": False})
                done = next(e for e in events if e.get("done"))
                t2 = done["at"]  # the steered side's last token has arrived (the stream then closes)
                t2b = time.perf_counter()
                post_stream(url, body)
                t3 = time.perf_counter()
                if done["text"] != direct:
                    raise SystemExit(f"server and library disagree:\n{done['text']!r}\n{direct!r}")
                direct_s.append(t1 - t0)
                server_s.append(t2 - t1)
                page_s.append(t3 - t2b)
            if args.screenshot:
                screenshot(url, vector_id, args.screenshot)
                print(f"wrote {args.screenshot}")
        playground.close()
    n = len(done["ids"])
    direct_med, server_med, page_med = (statistics.median(x) for x in (direct_s, server_s, page_s))
    ratios = [s / d for s, d in zip(server_s, direct_s)]
    print(f"{n} steered tokens, {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"direct library call : {n / direct_med:6.2f} tokens/s  (median {direct_med:.3f} s)")
    print(f"through the server  : {n / server_med:6.2f} tokens/s  (median {server_med:.3f} s)")
    print(
        f"server / direct time: median of per-round ratios {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    print(f"page request (both sides + shading) / two direct calls: {page_med / (2 * direct_med):.3f}")
    print(
        json.dumps(
            {
                "server_over_direct": round(server_med / direct_med, 4),
                "server_over_direct_per_round_median": round(statistics.median(ratios), 4),
                "direct_tokens_per_s": round(n / direct_med, 3),
                "server_tokens_per_s": round(n / server_med, 3),
                "page_request_over_two_direct": round(page_med / (2 * direct_med), 4),
                "tokens": n,
                "rounds": args.rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
