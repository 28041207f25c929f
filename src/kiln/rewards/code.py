"""The verifiable rewards of `kiln rl`'s default tasks, `module:function` names for `rl.reward`.

- `code_reward` (the code task): 1 when the completed function parses, is no stub, reads its
  arguments and no undefined name (`static_problem`), and, where the row holds doctests that the
  original function passes on its own, passes them too, run in the sandbox (`kiln.rewards.sandbox`);
- `docstring_reward` (the docstring task): word-overlap F1 against the real docstring summary
  (`kiln.rewards.text.word_f1`).

Each takes the prompt, the completion and the row's fields, and returns (reward, reason). The
rows themselves (the stdlib functions, their headers and doctests) are made by
`kiln.data.preference_default`.
"""

from __future__ import annotations

import ast
import builtins
import re
import secrets
from collections.abc import Iterator

from kiln.config import SandboxConfig
from kiln.rewards.text import word_f1


def trivial_body(body: list[ast.stmt]) -> bool:
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


def bound_names(nodes: list[ast.AST]) -> set[str] | None:
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


def fill_template(template: str, **values: str) -> str:
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
        local = bound_names(body) or set()
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
    if trivial_body(_body(defs[0])):
        return 0.0, "empty_body"
    problem = static_problem(defs[0], module_names)
    if problem:
        return 0.0, problem
    if not doctest:
        return 1.0, "parsed"
    from kiln.rewards.sandbox import run_python

    nonce = "KILN-DOCTEST-" + secrets.token_hex(8)
    runner = fill_template(_RUN_DOCTEST, NONCE=nonce, DOC=repr(doctest), NAME=repr(entry_point))
    result = run_python(f"{setup}\n{program}\n{runner}", sandbox)
    found = re.findall(rf"^{nonce} (\d+) (\d+) (\S+)$", result.stdout, re.M)
    if not result.ok or not found:
        return 0.0, f"sandbox_{result.reason}"
    failures, tries, raised = found[-1]
    if int(failures) == 0 and int(tries) > 0:
        return 1.0, "doctest_passed"
    first = raised.split(",")[0]
    return 0.0, "doctest_failed" if first == "-" else f"doctest_{first}"


def docstring_reward(prompt: str, completion: str, reference: str = "", **_) -> tuple[float, str]:
    """The docstring task's reward: word-overlap F1 of the reply against the real docstring summary
    (`kiln.rewards.text.word_f1`, the SFT task metric), so every reply earns partial credit and a
    group's rewards differ. An empty reply scores 0 ("empty")."""
    if not completion.strip():
        return 0.0, "empty"
    score = word_f1(completion, reference)
    return score, "f1_zero" if score == 0 else "f1_partial" if score < 1 else "f1_exact"
