"""The embedded vision adapter on held-out generated images, next to the blind baseline.

For each task (colour, shape, count 1-5, position, read a rendered word), --per-task held-out
images (service/multimodal/vision/synth.py, split "heldout": seeds the training never drew) are
asked their templated question through the frozen LM with the adapter's image rows spliced in
(prompt.py), greedy, in fp32; and the same questions are asked blind (no image, no placeholder).
An answer counts when the expected label is a whole word of it (synth.matches: "three" = "3").
Also reported: adapter throughput in images/s (encoder + projector forward on preprocessed
batches) and preprocessing (512x512 PIL image -> pixels) images/s.

    .venv/bin/python bench/vision.py [--adapter models/vision/smollm2-135m-vision] [--per-task 100]
        [--side 0] [--batch 32]
    .venv/bin/python bench/vision.py --per-task 8   # smoke run

--side 512 renders every image at 512x512 (the API's size); 0 keeps the generator's 256-512 px.
Prints one JSON line; writes bench/results/vision.md (--out-name to change).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, print_json, write_markdown  # noqa: E402

DEFAULT_ADAPTER = ROOT / "models" / "vision" / "smollm2-135m-vision"
HELDOUT_START = 10**7  # bench images: far from the training run's own held-out check (0..) and diagnostics (10**6..)


def lm_dir(model_id: str) -> Path:
    from service.config import Settings
    from service.pool.manifest import Registry
    from service.pool.sources import is_pulled, model_dir

    settings = Settings()
    m = Registry(settings.manifests_dir).get(model_id)
    if not is_pulled(settings.models_dir, m):
        raise SystemExit(f"{model_id} is not pulled: run `frontier pull {model_id}` first")
    return model_dir(settings.models_dir, m)


def throughput(adapter, batch: int, seconds: float = 5.0) -> tuple[float, float]:
    """(adapter forward images/s on preprocessed batches, preprocessing images/s from 512x512)."""
    from service.multimodal.vision import synth

    images = [synth.example("heldout", HELDOUT_START + i, side=512).image for i in range(batch)]
    t0 = time.perf_counter()
    pixels = torch.stack([adapter.preprocess(im) for im in images])
    pre = batch / (time.perf_counter() - t0)
    with torch.inference_mode():
        adapter(pixels)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            adapter(pixels)
            n += batch
    return n / (time.perf_counter() - t0), pre


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER)
    ap.add_argument("--lm", default=None, help="model id (default: the adapter config's lm)")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--side", type=int, default=0, help="render at SIDE x SIDE (0: 256-512 as generated)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out-name", default="vision")
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    from service.multimodal.vision import synth
    from service.multimodal.vision.generate import ask
    from service.multimodal.vision.model import load_adapter, num_parameters
    from service.multimodal.vision.run import load_lm

    adapter = load_adapter(args.adapter)
    model_id = args.lm or adapter.config.get("lm") or "smollm2-135m-instruct"
    lm, tokenizer = load_lm(lm_dir(model_id))
    results, rows, samples = {}, [], {}
    t_start = time.perf_counter()
    for task in synth.TASKS:
        exs = [synth.example("heldout", HELDOUT_START + i, task, side=args.side or None) for i in range(args.per_task)]
        qs = [e.question for e in exs]
        seen = ask(lm, tokenizer, adapter, [e.image for e in exs], qs, batch=args.batch)
        blind = ask(lm, tokenizer, None, None, qs, batch=args.batch)
        acc = sum(synth.matches(a, e.answer) for a, e in zip(seen, exs)) / len(exs)
        acc_blind = sum(synth.matches(a, e.answer) for a, e in zip(blind, exs)) / len(exs)
        results[task] = {"adapter": round(acc, 3), "blind": round(acc_blind, 3), "n": len(exs)}
        samples[task] = [(e.question, e.answer, s, b) for e, s, b in zip(exs[:2], seen, blind)]
        rows.append([task, f"{100 * acc:.1f}%", f"{100 * acc_blind:.1f}%", len(exs)])
        print(f"{task}: adapter {acc:.3f}  blind {acc_blind:.3f}", file=sys.stderr, flush=True)
    eval_seconds = time.perf_counter() - t_start
    ips, pre_ips = throughput(adapter, args.batch)
    weights = args.adapter / "adapter.safetensors"
    record = {"bench": "vision", "adapter": str(args.adapter), "lm": model_id, "per_task": args.per_task,
              "side": args.side or "256-512", "accuracy": results, "encoder_images_per_s": round(ips, 1),
              "preprocess_images_per_s": round(pre_ips, 1), "parameters": num_parameters(adapter),
              "weights_bytes": weights.stat().st_size, "num_image_tokens": adapter.num_image_tokens,
              "image_size": adapter.image_size, "eval_seconds": round(eval_seconds, 1),
              "training": adapter.config.get("training", {})}
    train = adapter.config.get("training", {})
    notes = "\n".join([
        f"Adapter `{args.adapter.relative_to(ROOT) if args.adapter.is_relative_to(ROOT) else args.adapter}` "
        f"({num_parameters(adapter) / 1e6:.2f} M parameters, {weights.stat().st_size / 1e6:.1f} MB fp16; "
        f"{adapter.num_image_tokens} image tokens at {adapter.image_size}x{adapter.image_size}) into frozen "
        f"`{model_id}`; trained on CPU in {train.get('seconds', '?')} s "
        f"({train.get('warmup', {}).get('steps', '?')} warm-up + {train.get('lm_stage', {}).get('steps', '?')} "
        "LM steps, `frontier train-vision`).",
        "",
        f"{args.per_task} held-out images per task (rendered at "
        f"{f'{args.side}x{args.side}' if args.side else '256-512 px'}), greedy fp32, one templated question each; "
        "blind = the same question with no image. A hit: the expected label is a whole word of the answer.",
        "",
        f"Adapter forward: {ips:.0f} images/s (batch {args.batch}, preprocessed); preprocessing a 512x512 image: "
        f"{pre_ips:.0f} images/s. Answering took {eval_seconds:.0f} s for "
        f"{2 * args.per_task * len(synth.TASKS)} prompts.",
        "",
        "Examples (question / expected / with image / blind):",
        "",
        *[f"- {t}: {q!r} / {a!r} / {s!r} / {b!r}" for t, ss in samples.items() for q, a, s, b in ss],
    ])
    path = write_markdown(args.out_name, "Vision adapter: held-out accuracy against the blind baseline",
                          ["task", "with image", "blind", "images"], rows, notes)
    print(f"wrote {path}", file=sys.stderr)
    print_json(record)


if __name__ == "__main__":
    main()
