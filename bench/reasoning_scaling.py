"""Accuracy against thinking budget (and against K for self-consistency) on seeded arithmetic
word problems with checkable answers. Talks to the server over the OpenAI API, so the same
harness runs unchanged for any reasoning model named in a manifest (--model).

    .venv/bin/python bench/reasoning_scaling.py                 # starts a server on the defaults
    .venv/bin/python bench/reasoning_scaling.py --base-url http://host:8000 --model my-reasoner
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, Server, print_json, write_markdown  # noqa: E402
from service.reasoning.voting import normalize_answer  # noqa: E402

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies"]


def make_problems(n: int, seed: int) -> list[tuple[str, int]]:
    """Two- and three-step problems: buy, give away, share."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        kind = rng.randrange(3)
        if kind == 0:
            q, ans = f"{name} has {a} bags with {b} {item} each and gives away {c}. How many {item} are left?", a * b - c
        elif kind == 1:
            c = min(c, a + b - 1)
            q, ans = f"{name} buys {a} {item}, then {b} more, then eats {c}. How many {item} now?", a + b - c
        else:
            q, ans = f"{name} has {a * b} {item} and shares them equally among {a} friends, then finds {c} more. " \
                     f"How many {item} does one friend end up with if they get the found ones too?", b + c
        problems.append((q + " Answer with a number.", ans))
    return problems


def ask(client, model: str, question: str, reasoning: dict | None, seed: int) -> dict:
    extra = {"reasoning": reasoning} if reasoning else {"reasoning_effort": "none"}
    t0 = time.monotonic()
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=32, seed=seed, extra_body=extra)
    msg = r.choices[0].message
    details = r.usage.completion_tokens_details
    return {"answer": msg.content or "", "tokens": r.usage.completion_tokens,
            "reasoning_tokens": details.reasoning_tokens if details else 0, "seconds": time.monotonic() - t0}


def sweep(client, model: str, problems, configs, concurrency: int, seed: int) -> list[dict]:
    points = []
    for label, reasoning in configs:
        t0 = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda qa: ask(client, model, qa[0], reasoning, seed), problems))
        correct = sum(normalize_answer(r["answer"]) == str(ans) for r, (_, ans) in zip(results, problems))
        points.append({"config": label, "accuracy": correct / len(problems),
                       "tokens_per_problem": sum(r["tokens"] for r in results) / len(problems),
                       "reasoning_tokens_per_problem": sum(r["reasoning_tokens"] for r in results) / len(problems),
                       "wall_s": round(time.monotonic() - t0, 1)})
        print(points[-1], file=sys.stderr)
    return points


def plot(points_budget, points_k, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p["reasoning_tokens_per_problem"] for p in points_budget]
    axes[0].plot(xs, [p["accuracy"] for p in points_budget], marker="o")
    for p, x in zip(points_budget, xs):
        axes[0].annotate(p["config"], (x, p["accuracy"]), fontsize=8)
    axes[0].set(xlabel="thinking tokens per problem (measured)", ylabel="accuracy", title="Accuracy vs budget")
    axes[1].plot([p["k"] for p in points_k], [p["accuracy"] for p in points_k], marker="o")
    axes[1].set(xlabel="self-consistency samples K", ylabel="accuracy", title="Accuracy vs K")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", help="an already running server (default: start one)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--budgets", default="0,32,64,128,256")
    ap.add_argument("--ks", default="1,3,5")
    ap.add_argument("--k-budget", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    problems = make_problems(args.problems, args.seed)
    budgets = [int(b) for b in args.budgets.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    budget_configs = [(f"budget={b}" if b else "none", {"max_tokens": b} if b else None) for b in budgets]
    k_configs = [(f"K={k}", {"max_tokens": args.k_budget, "strategy": "self_consistency", "samples": k}
                  if k > 1 else {"max_tokens": args.k_budget}) for k in ks]

    def run(base_url: str):
        from openai import OpenAI

        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=600, max_retries=0)
        pb = sweep(client, args.model, problems, budget_configs, args.concurrency, args.seed)
        pk = sweep(client, args.model, problems, k_configs, args.concurrency, args.seed)
        return pb, pk

    if args.base_url:
        pb, pk = run(args.base_url)
    else:
        with Server(log_name="reasoning") as srv:
            pb, pk = run(srv.base_url)
    for p, k in zip(pk, ks):
        p["k"] = k
    rows = [[p["config"], f"{p['accuracy']:.2f}", f"{p['reasoning_tokens_per_problem']:.0f}",
             f"{p['tokens_per_problem']:.0f}", p["wall_s"]] for p in pb + pk]
    notes = (f"{args.problems} seeded arithmetic word problems (seed {args.seed}), model `{args.model}`; "
             f"K rows use a thinking budget of {args.k_budget}. Answer = last number in the reply.")
    write_markdown("reasoning_scaling", "Reasoning: accuracy vs thinking budget and self-consistency K",
                   ["config", "accuracy", "thinking tok/problem", "completion tok/problem", "wall s"], rows, notes)
    plot(pb, pk, RESULTS / "reasoning_scaling.png")
    print_json({"bench": "reasoning_scaling", "model": args.model, "problems": args.problems,
                "budget": pb, "self_consistency": pk})


if __name__ == "__main__":
    main()
