"""The embedded defaults for alignment, made from this interpreter's standard library with `ast`:

- preference pairs (`kiln reward`, `kiln dpo`): the SFT task's "write the docstring for this
  function" prompt (`kiln.data.sft_default`), the real docstring summary chosen over a mismatched
  one (another module's function) or a corrupted one (its own words shuffled), each row's `kind`
  saying which;
- RL prompts (`kiln rl`): a module-level function's signature and docstring, whose body the
  policy writes (plain-text format, after pretraining), or the SFT task's "write the function
  described by this docstring" (chat format); `kiln.rewards.code:code_reward` pays 1 when the
  result parses, is no stub, reads its arguments and no undefined name, and, where the docstring
  holds doctests that the original function passes on its own (checked here, in the sandbox
  `kiln.rewards.sandbox`), passes them too.

Held-out rows come from held-out modules (by a hash of the file name), so evaluation measures
functions and vocabulary the model has not been trained on.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.config import SandboxConfig
from kiln.data.sft_default import DOCSTRING_PROMPT, FUNCTION_PROMPT
from kiln.data.sft_default import summary as sft_summary
from kiln.data.sources import stdlib_files, stdlib_root
from kiln.rewards.code import bound_names, fill_template, trivial_body

SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "__phello__", "site-packages",
             "dist-packages", "config-3.11-x86_64-linux-gnu"}
MAX_CODE_CHARS, MAX_HEADER_CHARS = 600, 700
MAX_RL_CODE_CHARS = 360  # RL functions whose own code fits about 96 new tokens (rl.max_new_tokens)


@dataclass
class Function:
    file: str  # relative to the stdlib root
    name: str
    summary: str  # the docstring's first paragraph on one line
    code: str  # the function without its docstring
    header: str  # signature and docstring: a prefix the body completes (module-level functions)
    doctest: str  # the docstring, when it holds examples
    setup: str  # the module's absolute imports, each in its own try (one that fails here must not stop the rest)
    module_level: bool
    module_names: tuple[str, ...] | None = None  # names the module binds at top level (None: a `*` import hides some)


def _held_out(file: str, fraction: float) -> bool:
    return int(hashlib.sha256(file.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def _files(seed: int) -> list[Path]:
    files = [f for f in stdlib_files() if not SKIP_DIRS & set(f.relative_to(stdlib_root()).parts)
             and not f.name.startswith("test_")]
    random.Random(seed).shuffle(files)
    return files


def functions_of(path: Path) -> Iterator[Function]:
    """Documented functions (module level and methods) of one source file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    lines = source.splitlines()
    rel = str(path.relative_to(stdlib_root()))
    setup = "".join(f"try:\n    {ast.unparse(n)}\nexcept Exception:\n    pass\n" for n in tree.body
                    if isinstance(n, ast.Import) or (isinstance(n, ast.ImportFrom) and not n.level and n.module != "__future__"))
    module_names = bound_names(tree.body)
    nodes = [(n, True) for n in tree.body]
    nodes += [(m, False) for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body]
    for node, top in nodes:
        if not isinstance(node, ast.FunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20 or len(node.body) < 2 or trivial_body(node.body[1:]):
            continue
        indent = node.col_offset
        first, doc_end = node.lineno - 1, node.body[0].end_lineno
        body_start = node.body[1].lineno - 1
        signature = lines[first : node.body[0].lineno - 1]
        rest = lines[body_start : node.end_lineno]
        code = "\n".join(ln[indent:] for ln in signature + rest)
        header = "\n".join(ln[indent:] for ln in lines[first:doc_end]) + "\n"
        summary = sft_summary(doc)
        if len(code) > MAX_CODE_CHARS or not 10 <= len(summary) <= 300:  # the SFT task's limits
            continue
        yield Function(rel, node.name, summary, code, header, doc if ">>>" in doc else "", setup, top,
                       tuple(sorted(module_names)) if module_names is not None else None)


def _collect(want_train: int, want_val: int, val_fraction: float, seed: int, keep) -> tuple[list, list]:
    train, val = [], []
    for f in _files(seed):
        side = val if _held_out(str(f.relative_to(stdlib_root())), val_fraction) else train
        if len(side) >= (want_val if side is val else want_train):
            if len(train) >= want_train and len(val) >= want_val:
                break
            continue
        side.extend(fn for fn in functions_of(f) if keep(fn))
    return train[:want_train], val[:want_val]


def _shuffled(words: list[str], rng: random.Random) -> list[str]:
    for _ in range(10):
        out = words[:]
        rng.shuffle(out)
        if out != words:
            return out
    return words[::-1]


def _other(fn: Function, funcs: list[Function], rng: random.Random) -> Function | None:
    """A function of another module with another summary, drawn at random (None if there is none)."""
    for _ in range(50):
        g = rng.choice(funcs)
        if g.file != fn.file and g.summary != fn.summary:
            return g
    return None


def _pairs(funcs: list[Function], rng: random.Random) -> list[dict]:
    rows = []
    for fn in funcs:
        words = fn.summary.split()
        other = _other(fn, funcs, rng) if rng.random() < 0.5 or len(set(words)) < 3 else None
        if other is not None:
            rejected, kind = other.summary, "mismatched"
        elif len(set(words)) >= 3:
            rejected, kind = " ".join(_shuffled(words, rng)), "shuffled"
        else:
            continue
        rows.append({"prompt": DOCSTRING_PROMPT.format(code=fn.code), "chosen": fn.summary, "rejected": rejected,
                     "source": f"{fn.file}:{fn.name}", "kind": kind})
    return rows


def default_pairs(n: int, val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference rows in TRL's text format, `n` in all."""
    n_val = max(8, math.ceil(n * val_fraction))
    train, val = _collect(n - n_val, n_val, val_fraction, seed, lambda fn: True)
    rng = random.Random(seed)
    return _pairs(train, rng), _pairs(val, rng)


# ---- RL ----------------------------------------------------------------------------------------
def default_prompts(n: int, val_fraction: float, seed: int = 0,
                    sandbox: SandboxConfig | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) RL rows: `header` (signature + docstring), `entry_point`, and `doctest` /
    `setup` where the original function passes its own doctests standalone (checked in the sandbox)."""
    n_val = max(4, math.ceil(n * val_fraction))
    train, val = _collect(n - n_val, n_val, val_fraction, seed,
                          lambda fn: fn.module_level and len(fn.header) <= MAX_HEADER_CHARS
                          and len(fn.code) <= MAX_RL_CODE_CHARS)
    passing = _passing_doctests([fn for fn in train + val if fn.doctest], sandbox)
    return [_prompt_row(fn, passing) for fn in train], [_prompt_row(fn, passing) for fn in val]


def docstring_prompts(n: int, val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) RL rows of the docstring task: the SFT task's "Write the docstring for this
    function" (chat format) with the function's real docstring summary as `reference`, held-out rows
    from held-out modules (the same split as the default preference pairs)."""
    n_val = max(4, math.ceil(n * val_fraction))
    train, val = _collect(n - n_val, n_val, val_fraction, seed, lambda fn: len(fn.code) <= MAX_CODE_CHARS)

    def row(fn: Function) -> dict:
        prompt = DOCSTRING_PROMPT.format(code=fn.code)
        return {"prompt": prompt, "chat_prompt": prompt, "reference": fn.summary, "source": f"{fn.file}:{fn.name}"}

    return [row(fn) for fn in train], [row(fn) for fn in val]


def _prompt_row(fn: Function, passing: set[str]) -> dict:
    ok = f"{fn.file}:{fn.name}" in passing
    # the text prompt is the header as written, ending in the docstring's newline: the tokenizer merged
    # that newline with the next line's indent in training, and the rollouts heal it (rl.heal)
    return {"prompt": fn.header, "chat_prompt": FUNCTION_PROMPT.format(name=fn.name, doc=fn.summary),
            "header": fn.header, "entry_point": fn.name,
            "doctest": fn.doctest if ok else "", "setup": fn.setup if ok else "", "source": f"{fn.file}:{fn.name}",
            "module_names": list(fn.module_names) if fn.module_names is not None else None}


def _passing_doctests(funcs: list[Function], sandbox: SandboxConfig | None) -> set[str]:
    """Which functions pass their own doctests given only their module's imports: one sandbox run for all."""
    if not funcs:
        return set()
    from kiln.rewards.sandbox import run_python

    cases = [{"key": f"{fn.file}:{fn.name}", "setup": fn.setup, "code": fn.header + _body_of(fn), "name": fn.name,
              "doc": fn.doctest} for fn in funcs]
    program = fill_template(_CHECK_ALL, CASES=repr(json.dumps(cases)))
    limits = sandbox or SandboxConfig()
    result = run_python(program, SandboxConfig(timeout_s=max(30.0, limits.timeout_s), memory_mb=max(1024, limits.memory_mb),
                                               max_output_bytes=1 << 20, max_procs=limits.max_procs,
                                               max_file_mb=limits.max_file_mb, tmp_dir=limits.tmp_dir))
    found = set(re.findall(r"^KILN-PASS (.+)$", result.stdout, re.M))
    # the examples must call the function itself: `>>> subprocess.getoutput(...)` tests the
    # module's copy, which any body would "pass"
    return {f"{fn.file}:{fn.name}" for fn in funcs if f"{fn.file}:{fn.name}" in found and _calls_itself(fn)}


def _calls_itself(fn: Function) -> bool:
    import doctest

    calls = re.compile(rf"(?<![\w.]){re.escape(fn.name)}\s*\(")
    return any(calls.search(ex.source) for ex in doctest.DocTestParser().get_examples(fn.doctest))


def _body_of(fn: Function) -> str:
    """The original body (what follows the header), re-read from the source file."""
    source = (stdlib_root() / fn.file).read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == fn.name:
            lines = source.splitlines()
            return "\n".join(lines[node.body[0].end_lineno : node.end_lineno]) + "\n"
    return ""


_CHECK_ALL = r'''
import doctest, json, sys
for case in json.loads(@@CASES@@):
    g = {"__name__": "__kiln_check__"}
    try:
        exec(case["setup"], g)
        exec(case["code"], g)
        test = doctest.DocTestParser().get_doctest(case["doc"], g, case["name"], "main.py", 0)
        runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
        runner.run(test, out=lambda s: None)
        if runner.tries and not runner.failures:
            print("KILN-PASS", case["key"], flush=True)
    except BaseException:
        pass
'''
