"""The embedded defaults for alignment, made from this interpreter's standard library with `ast`:

- preference pairs (`kiln reward`, `kiln dpo`): the SFT task's "write the docstring for this
  function" prompt (`kiln.data.sft_default`), the real docstring summary chosen over a mismatched
  one (another module's function) or a corrupted one (its own words shuffled), each row's `kind`
  saying which;
- RL prompts (`kiln rl`): a module-level function's signature and docstring, whose body the
  policy writes (plain-text format, after pretraining), or the SFT task's "write the function
  described by this docstring" (chat format); `code_reward` pays 1 when the result parses, is
  no stub, reads its arguments and no undefined name, and, where the docstring holds doctests
  that the original function passes on its own, passes them too, run in the sandbox
  (`kiln.train.sandbox`).

Held-out rows come from held-out modules (by a hash of the file name), so evaluation measures
functions and vocabulary the model has not been trained on.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import math
import random
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.config import SandboxConfig
from kiln.data.sft_default import DOCSTRING_PROMPT, FUNCTION_PROMPT, word_f1
from kiln.data.sft_default import summary as sft_summary
from kiln.data.sources import stdlib_files, stdlib_root

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


def _trivial(body: list[ast.stmt]) -> bool:
    """A stub: nothing but a docstring, `pass`, `...`, a bare `return` / `return None`,
    `raise NotImplementedError`, nested definitions, or `if` statements holding only these. It parses but writes no function, and a policy rewarded for
    parsing alone finds it within a few steps (measured: a bare `return` after 10)."""
    def stub(s: ast.stmt) -> bool:
        if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
            return True
        if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return True  # defining something and never using it does nothing (GRPO found that one too)
        if isinstance(s, ast.If):  # every branch a stub: a no-op behind a test (`if isinstance(x, str): return None`)
            return all(stub(b) for b in s.body + s.orelse)
        if isinstance(s, ast.Return):
            return s.value is None or (isinstance(s.value, ast.Constant) and s.value.value is None)
        if isinstance(s, ast.Raise) and s.exc is not None:
            exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
            return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
        return False

    return all(stub(s) for s in body)


def _bound_names(nodes: list[ast.AST]) -> set[str] | None:
    """Every name the statements bind in their own scope (assignments, loop and `with` targets,
    imports, `def` and `class` names, `except ... as`, `global`); None when a `from m import *`
    makes that unknowable. Function and class bodies are not entered (their names are theirs)."""
    names: set[str] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if a.name == "*":
                    return None
                names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name:
            names.add(node.name)
        todo.extend(ast.iter_child_nodes(node))
    return names


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
    module_names = _bound_names(tree.body)
    nodes = [(n, True) for n in tree.body]
    nodes += [(m, False) for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body]
    for node, top in nodes:
        if not isinstance(node, ast.FunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20 or len(node.body) < 2 or _trivial(node.body[1:]):
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


def docstring_reward(prompt: str, completion: str, reference: str = "", **_) -> tuple[float, str]:
    """The docstring task's reward: word-overlap F1 of the reply against the real docstring summary
    (`kiln.data.sft_default.word_f1`, the SFT task metric), so every reply earns partial credit and a
    group's rewards differ. An empty reply scores 0 ("empty")."""
    if not completion.strip():
        return 0.0, "empty"
    score = word_f1(completion, reference)
    return score, "f1_zero" if score == 0 else "f1_partial" if score < 1 else "f1_exact"


def _prompt_row(fn: Function, passing: set[str]) -> dict:
    ok = f"{fn.file}:{fn.name}" in passing
    # the text prompt stops at the docstring's closing quotes, not after its newline: the tokenizer
    # merges a newline with the next line's indent, so a prompt ending in a bare newline is one the
    # model has rarely seen (greedy completions then end the function at once)
    return {"prompt": fn.header.rstrip("\n"), "chat_prompt": FUNCTION_PROMPT.format(name=fn.name, doc=fn.summary),
            "header": fn.header, "entry_point": fn.name,
            "doctest": fn.doctest if ok else "", "setup": fn.setup if ok else "", "source": f"{fn.file}:{fn.name}",
            "module_names": list(fn.module_names) if fn.module_names is not None else None}


def _passing_doctests(funcs: list[Function], sandbox: SandboxConfig | None) -> set[str]:
    """Which functions pass their own doctests given only their module's imports: one sandbox run for all."""
    if not funcs:
        return set()
    from kiln.train.sandbox import run_python

    cases = [{"key": f"{fn.file}:{fn.name}", "setup": fn.setup, "code": fn.header + _body_of(fn), "name": fn.name,
              "doc": fn.doctest} for fn in funcs]
    program = _fill(_CHECK_ALL, CASES=repr(json.dumps(cases)))
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

# Appended to a completed program: runs the row's doctests against its function and reports
# failures, tries and the exceptions examples raised, on one line marked with a per-call nonce.
_RUN_DOCTEST = r'''
import doctest as _kiln_doctest
class _KilnRunner(_kiln_doctest.DocTestRunner):
    raised = []
    def report_unexpected_exception(self, out, test, example, exc_info):
        self.raised.append(exc_info[0].__name__)
        return super().report_unexpected_exception(out, test, example, exc_info)
_kiln_runner = _KilnRunner(verbose=False, optionflags=_kiln_doctest.ELLIPSIS)
_kiln_runner.run(_kiln_doctest.DocTestParser().get_doctest(@@DOC@@, dict(globals()), @@NAME@@, "main.py", 0), out=lambda s: None)
print("\n@@NONCE@@", _kiln_runner.failures, _kiln_runner.tries, ",".join(_kiln_runner.raised) or "-", flush=True)
'''


def _fill(template: str, **values: str) -> str:
    """`template` with each @@KEY@@ replaced in one pass (a value holding another key stays as it is)."""
    return re.sub(r"@@(\w+)@@", lambda m: values[m.group(1)], template)


def _program(completion: str, header: str, entry_point: str) -> tuple[str, ast.Module] | tuple[None, str]:
    """The program a completion stands for: the completion alone when it defines the function
    (chat format: the whole function), else header + completion (a body). (program, tree) or (None, reason)."""
    text = completion.strip("\n")
    fence = re.match(r"^```(?:python)?\n(.*?)\n```", text, re.S)
    text = fence.group(1) if fence else completion
    tried = [text] if re.search(rf"^def {re.escape(entry_point)}\b", text, re.M) else []
    tried.append(header + completion)
    for program in tried:
        try:
            return program, ast.parse(program)
        except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
            continue
    return None, "syntax_error"


def _body(fn: ast.FunctionDef) -> list[ast.stmt]:
    """A function's statements after its docstring."""
    return fn.body[1:] if ast.get_docstring(fn) else fn.body


_BUILTINS = frozenset(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__builtins__"}


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _own_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """The nodes of a function body in its own scope: nested functions, lambdas and classes are
    not entered (their names are theirs), though their decorators and defaults are."""
    todo = list(body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, _SCOPES):
            outer = [*node.decorator_list] if not isinstance(node, ast.Lambda) else []
            if not isinstance(node, ast.ClassDef):
                outer += [d for d in node.args.defaults + node.args.kw_defaults if d is not None]
            else:
                outer += node.bases + [k.value for k in node.keywords]
            todo.extend(outer)
            continue
        todo.extend(ast.iter_child_nodes(node))


def static_problem(fn: ast.FunctionDef, module_names: list[str] | tuple[str, ...] | None) -> str | None:
    """What a linter would flag in a function that cannot be right, or None. "ignores_arguments":
    it takes parameters and its body reads none of them (`return os` for `isleap(year)`);
    "returns_argument": its whole body is `return <a parameter>` (`return year`);
    "undefined_name": it reads a name that neither it, its parameters, its module
    (`module_names`; unchecked when None) nor the builtins define, a NameError when it runs.
    Names are taken in the function's own scope: a nested function's parameters bind nothing
    outside it."""
    a = fn.args
    params = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if p is not None}
    body = _body(fn)
    read = {n.id for n in _own_nodes(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    in_closures = {n.id for s in body for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if params and not in_closures & params:  # a nested function reading an argument uses it too
        return "ignores_arguments"
    if len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, ast.Name) \
            and body[0].value.id in params:
        return "returns_argument"
    if module_names is not None:
        local = _bound_names(body) or set()
        if read - local - params - set(module_names) - _BUILTINS:
            return "undefined_name"
    return None


def code_reward(prompt: str, completion: str, entry_point: str = "", header: str = "", doctest: str = "",
                setup: str = "", sandbox: SandboxConfig | None = None, module_names: list[str] | None = None,
                **_) -> tuple[float, str]:
    """1.0 when the completed function parses, is more than a stub, passes `static_problem`'s
    checks, and (where the row has doctests) passes them in the sandbox; else 0.0. Returns
    (reward, reason)."""
    program, tree = _program(completion, header or prompt, entry_point)
    if program is None:
        return 0.0, tree
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and (not entry_point or n.name == entry_point)]
    if not defs:
        return 0.0, "no_function"
    if _trivial(_body(defs[0])):
        return 0.0, "empty_body"
    problem = static_problem(defs[0], module_names)
    if problem:
        return 0.0, problem
    if not doctest:
        return 1.0, "parsed"
    from kiln.train.sandbox import run_python

    nonce = "KILN-DOCTEST-" + secrets.token_hex(8)
    runner = _fill(_RUN_DOCTEST, NONCE=nonce, DOC=repr(doctest), NAME=repr(entry_point))
    result = run_python(f"{setup}\n{program}\n{runner}", sandbox)
    found = re.findall(rf"^{nonce} (\d+) (\d+) (\S+)$", result.stdout, re.M)
    if not result.ok or not found:
        return 0.0, f"sandbox_{result.reason}"
    failures, tries, raised = found[-1]
    if int(failures) == 0 and int(tries) > 0:
        return 1.0, "doctest_passed"
    first = raised.split(",")[0]
    return 0.0, "doctest_failed" if first == "-" else f"doctest_{first}"
