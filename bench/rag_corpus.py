"""A real text corpus for retrieval quality, built offline from installed packages' API docs.

Every public function, method and class of numpy, scipy and scikit-learn with a numpydoc-style
docstring becomes a document: its qualified name as a markdown heading, then the docstring *without
its one-line summary* (the extended summary, Parameters, Returns, Notes...). The removed summary
becomes the query ("Compute the arithmetic mean along the specified axis."), and the relevant
document is the one it came from: a known-item search, as a user who describes what a function
does and needs its documentation. Source files are read with `ast`; nothing is imported.

Filters: summary of 6-40 words, body of at least 300 characters (cut at 2,000), summaries that
occur more than once are dropped (ambiguous), and so are bodies that still contain the summary
verbatim. Selection is deterministic (sorted by package and path, every k-th).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("numpy", "scipy", "sklearn")
SKIP_DIRS = {"tests", "testing", "_vendor", "vendored", "externals", "_build_utils"}
MAX_BODY = 2000


@dataclass(frozen=True)
class Item:
    doc_id: str  # package-relative path : qualified name
    title: str
    summary: str  # the query
    body: str  # the document text (without the summary)

    @property
    def text(self) -> str:
        return f"# {self.title}\n\n{self.body}"


def _items_in_file(path: Path, rel: str, module: str):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    stack = [(node, module) for node in tree.body]
    while stack:
        node, prefix = stack.pop(0)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        qual = f"{prefix}.{node.name}"
        if isinstance(node, ast.ClassDef):
            stack += [(child, qual) for child in node.body]
        doc = ast.get_docstring(node)
        if not doc:
            continue
        parts = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
        if len(parts) != 2:
            continue
        summary = " ".join(parts[0].split())
        body = parts[1].strip()[:MAX_BODY]
        if not 6 <= len(summary.split()) <= 40 or len(body) < 300 or summary in body:
            continue
        yield Item(f"{rel}:{qual.split('.', 1)[-1]}", qual, summary, body)


def build_corpus(max_docs: int = 3000) -> list[Item]:
    items: list[Item] = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            continue
        root = Path(spec.origin).parent
        for path in sorted(root.rglob("*.py")):
            if SKIP_DIRS & set(path.relative_to(root).parts):
                continue
            rel = str(path.relative_to(root.parent))
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")
            items.extend(_items_in_file(path, rel, module))
    counts: dict[str, int] = {}
    for it in items:
        key = it.summary.lower()
        counts[key] = counts.get(key, 0) + 1
    seen: set[str] = set()
    unique = []
    for it in items:
        if counts[it.summary.lower()] == 1 and it.doc_id not in seen:
            seen.add(it.doc_id)
            unique.append(it)
    step = max(1, len(unique) // max_docs)
    return unique[::step][:max_docs]
