"""The default vision model as served: held-out accuracy through the API (the native engine, int8,
early fusion) next to the blind baseline, and time to first token with one 512x512 image against
the same question without it.

One server with the default model. Accuracy: --per-task held-out generated images per task
(service/multimodal/vision/synth.py, seeds the training never drew), rendered at 512x512, sent as
PNG data: URLs, greedy, max_tokens 8; blind = the same question without the image. TTFT: streamed
requests alternating with and without the image (a different image each time, so neither the
encoder cache nor the prefix cache helps), --ttft-runs each, median. Prints one JSON line; writes
bench/results/vision_api.md.

    .venv/bin/python bench/vision_api.py [--per-task 40] [--ttft-runs 15]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Server, print_json, write_markdown  # noqa: E402

MODEL = "smollm2-135m-instruct"
HELDOUT_START = 2 * 10**7  # far from the training run's and bench/vision.py's seeds


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(question: str, image=None) -> list[dict]:
    if image is None:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": question}]}]


def answer(client: httpx.Client, question: str, image=None) -> str:
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages(question, image),
                                                  "max_tokens": 8, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def ttft(client: httpx.Client, question: str, image=None) -> float:
    body = {"model": MODEL, "messages": messages(question, image), "max_tokens": 4, "temperature": 0,
            "stream": True, "speculative": {"method": "off"}}
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    return time.perf_counter() - t0
    raise RuntimeError("no content in the stream")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--ttft-runs", type=int, default=15)
    args = ap.parse_args()
    from service.multimodal.vision import synth

    results, rows = {}, []
    with Server({"FRONTIER_MODELS": json.dumps([MODEL])}, log_name="vision_api") as srv, \
            httpx.Client(base_url=srv.base_url, timeout=120) as client:
        answer(client, "Hello")  # warm-up
        for task in synth.TASKS:
            exs = [synth.example("heldout", HELDOUT_START + i, task, side=512) for i in range(args.per_task)]
            seen = sum(synth.matches(answer(client, e.question, e.image), e.answer) for e in exs) / len(exs)
            blind = sum(synth.matches(answer(client, e.question), e.answer) for e in exs) / len(exs)
            results[task] = {"with_image": round(seen, 3), "blind": round(blind, 3), "n": len(exs)}
            rows.append([task, f"{100 * seen:.1f}%", f"{100 * blind:.1f}%", len(exs)])
            print(f"{task}: {seen:.3f} / blind {blind:.3f}", file=sys.stderr, flush=True)
        question = "What colour is the shape?"
        with_image, without = [], []
        for i in range(args.ttft_runs):
            image = synth.example("heldout", HELDOUT_START + 10**5 + i, "colour", side=512).image
            with_image.append(ttft(client, question, image))
            without.append(ttft(client, question))
    t_img, t_txt = statistics.median(with_image), statistics.median(without)
    record = {"bench": "vision_api", "model": MODEL, "accuracy": results, "ttft_image_ms": round(1e3 * t_img, 1),
              "ttft_text_ms": round(1e3 * t_txt, 1), "ttft_ratio": round(t_img / t_txt, 2)}
    print_json(record)
    notes = (f"Through the API (native engine, the server's default int8 path, early fusion), images rendered "
             f"at 512x512 and sent as PNG data: URLs, greedy, max_tokens 8; blind = the same question "
             f"without the image.\n\nTime to first token, one 512x512 image vs the same question without "
             f"it (streamed, {args.ttft_runs} each, alternating, a new image each time, median): "
             f"{1e3 * t_img:.1f} ms vs {1e3 * t_txt:.1f} ms, ratio {t_img / t_txt:.2f}x (target <= 1.5x).")
    write_markdown("vision_api", "Default vision model through the API: accuracy and time to first token",
                   ["task", "with image", "blind", "images"], rows, notes)


if __name__ == "__main__":
    main()
