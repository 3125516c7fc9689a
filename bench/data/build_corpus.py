"""Build the offline perplexity corpus from docstrings of packages installed in the venv.

No network here, so the text comes from permissively licensed package sources, read with `ast`
(nothing is imported or executed). Evaluation and calibration use *different packages*, so they
are disjoint and calibration cannot overfit the eval text. Run once; the JSONL files are committed:

    .venv/bin/python bench/data/build_corpus.py [--tokenizer /tmp/smol_st]
"""
import argparse
import ast
import importlib.util
import json
from pathlib import Path

# package -> license (from its installed metadata)
EVAL_PKGS = {"numpy": "BSD-3-Clause", "scipy": "BSD-3-Clause", "sklearn": "BSD-3-Clause",
             "networkx": "BSD-3-Clause", "sympy": "BSD-3-Clause"}
CALIB_PKGS = {"requests": "Apache-2.0", "click": "BSD-3-Clause", "httpx": "BSD-3-Clause",
              "pydantic": "MIT", "rich": "MIT", "pygments": "BSD-2-Clause",
              "starlette": "BSD-3-Clause", "torch": "BSD-3-Clause"}
MIN_DOC_CHARS, MAX_DOC_CHARS = 3500, 6000


def file_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = [d.strip() for n in nodes if (d := ast.get_docstring(n))]
    return "\n\n".join(d for d in docs if len(d) >= 200)


def package_docs(pkg: str, n: int, tok, n_tokens: int):
    root = Path(importlib.util.find_spec(pkg).origin).parent
    files = sorted(p for p in root.rglob("*.py")
                   if not {"tests", "testing", "_vendor", "vendored"} & set(p.parts))
    cands = []
    for p in files:
        text = file_docstrings(p)
        if len(text) < MIN_DOC_CHARS:
            continue
        text = text[:MAX_DOC_CHARS]
        if tok is not None and len(tok(text)["input_ids"]) < n_tokens + 8:
            continue
        cands.append((str(p.relative_to(root.parent)), text))
    step = max(1, len(cands) // n)  # evenly spaced over the package, deterministic
    return cands[::step][:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="/tmp/smol_st")
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    tok = None
    if Path(args.tokenizer).exists():
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    out = Path(__file__).parent
    for name, pkgs, per in (("eval", EVAL_PKGS, 4), ("calib", CALIB_PKGS, 4)):
        rows = []
        for pkg, lic in pkgs.items():
            for src, text in package_docs(pkg, per, tok, args.tokens):
                rows.append({"source": src, "license": lic, "text": text})
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(name, len(rows), "docs", sum(len(r["text"]) for r in rows), "chars")


if __name__ == "__main__":
    main()
