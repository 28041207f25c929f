"""The embedded default fine-tuning task: docstring ⇄ function conversations from real Python code.

Every function with a docstring in this interpreter's standard library (its `test` packages left
out), or in a directory of .py files, found with `ast`, gives two conversations:

    user: Write the docstring for this function.  <the function, its docstring removed>
    assistant: <the docstring's first paragraph>

    user: Write the Python function `name` described by this docstring.  <that paragraph>
    assistant: <the function, its docstring removed>

Deterministic: files in sorted order, exact duplicates dropped, and a function's two
conversations held out together when its code hashes below `val_fraction` (so no held-out
function is ever trained on). Written as `train.jsonl` / `val.jsonl` with a manifest, once per
run directory; a rerun with the same inputs reuses it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
import time
from collections import Counter
from pathlib import Path

from kiln import __version__
from kiln.data.sources import listing_fingerprint, stdlib_files
from kiln.errors import KilnError
from kiln.runs import atomic_dir, read_manifest, write_json

DOCSTRING_PROMPT = "Write the docstring for this function.\n\n{code}"
FUNCTION_PROMPT = "Write the Python function `{name}` described by this docstring.\n\n{doc}"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


def source_files(source: str) -> list[Path]:
    if source == "stdlib":
        files = stdlib_files()
    else:
        root = Path(source)
        if not root.is_dir():
            raise KilnError(f"sft.default_source={source!r} is neither 'stdlib' nor a directory of .py files")
        files = sorted(root.rglob("*.py"))
    files = [f for f in files if not _SKIP_DIRS & set(f.parts)]
    if not files:
        raise KilnError(f"sft.default_source={source!r} holds no .py files; give 'stdlib' or a directory of Python code")
    return files


def summary(doc: str) -> str:
    """A docstring's first paragraph on one line."""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def functions(text: str, counts: Counter) -> list[tuple[str, str, str]]:
    """(name, code without its docstring, docstring summary) of every documented function in `text`."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        counts["files that do not parse"] += 1
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        counts["functions"] += 1
        doc = ast.get_docstring(node)
        if not doc:
            continue
        first = node.body[0]
        if len(node.body) < 2 or first.lineno == node.lineno or first.end_lineno >= node.end_lineno:
            counts["nothing but a docstring"] += 1
            continue
        body = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(body)).strip("\n")
        out.append((node.name, code, summary(doc)))
    return out


def build_default_task(out_dir: str | Path, source: str = "stdlib", max_chars: int = 600,
                       val_fraction: float = 0.05) -> dict:
    """Write the default task into `out_dir` (train.jsonl, val.jsonl, manifest.json); returns the manifest."""
    out_dir = Path(out_dir)
    files = source_files(source)
    inputs = {"source": source, "listing": listing_fingerprint(files), "max_chars": max_chars,
              "val_fraction": val_fraction, "kiln_version": __version__}
    man = read_manifest(out_dir)
    if man is not None and man.get("inputs") == inputs:
        return man
    t0 = time.perf_counter()
    counts: Counter = Counter()
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            counts["files that cannot be read"] += 1
            continue
        for name, code, doc in functions(text, counts):
            if len(code) > max_chars or not 10 <= len(doc) <= 300:
                counts["outside the length limits"] += 1
                continue
            digest = hashlib.sha256(code.encode()).hexdigest()
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            split = "val" if int(digest[:8], 16) < val_fraction * 16**8 else "train"
            for user, reply in ((DOCSTRING_PROMPT.format(code=code), doc),
                                (FUNCTION_PROMPT.format(name=name, doc=doc), code)):
                splits[split].append({"messages": [{"role": "user", "content": user},
                                                   {"role": "assistant", "content": reply}]})
    if not splits["train"] or not splits["val"]:
        raise KilnError(f"sft.default_source={source!r} gave {len(splits['train'])} training and {len(splits['val'])} "
                        "held-out conversations; point it at more Python code or raise sft.default_max_chars")
    man = {"stage": "sft_default", "inputs": inputs, "files": len(files), "functions_used": len(seen),
           "counts": dict(counts), "conversations": {k: len(v) for k, v in splits.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    with atomic_dir(out_dir) as tmp:
        for split, records in splits.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        write_json(tmp / "manifest.json", man)
    return man
