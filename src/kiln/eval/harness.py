"""kiln models in lm-evaluation-harness: `KilnLM` implements the harness's model interface
(`loglikelihood`, `loglikelihood_rolling`, `generate_until`) on a kiln run, checkpoint or export,
so the standard benchmarks run on kiln checkpoints:

    import lm_eval
    from kiln.eval.harness import KilnLM
    lm_eval.simple_evaluate(model=KilnLM("runs/NAME"), tasks=["hellaswag"])

or `kiln eval eval.harness_tasks=hellaswag` (lm-eval downloads the task's data set). Importing
this module also registers the class under the name "kiln" (`--model kiln --model_args
pretrained=runs/NAME` in a program that imported it), beside the harness's own models (`hf`, ...),
which stay available. `KilnLM` is a `TemplateLM`, as the harness's own models are: a context's
trailing whitespace moves into the continuation and context and continuation are tokenized together
(the continuation is what the whole adds to the context), so scores equal the harness's `hf` model
on kiln's Hugging Face export whatever the context ends with. Every request is prefixed with <|bos|>, as
kiln's training documents and prompts are (an imported model's own BOS, or for a tokenizer without
one an empty context only, with the EOS that separates documents); chat requests render in the
model's chat format; generation is greedy, the one mode the interface asks for.
"""

from __future__ import annotations

# The harness's own models are registered first: "kiln" registered into an empty registry would stop
# the harness from ever loading them ("Supported model names: kiln").
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from kiln.data.chat import ROLE_TOKENS
from kiln.errors import KilnError
from kiln.eval.scoring import greedy_generate, rolling_windows, score_windows
from kiln.infer.load import Loaded, load


@register_model("kiln")
class KilnLM(TemplateLM):
    """A kiln model behind lm-evaluation-harness's `TemplateLM` interface (the harness tokenizes
    loglikelihood requests through `tok_encode` and scores them with `_loglikelihood_tokens`)."""

    def __init__(self, pretrained: str | None = None, device: str = "auto", batch_size: int | str = 8,
                 max_gen_toks: int | str = 256, allow_pickle: bool = False, loaded: Loaded | None = None) -> None:
        super().__init__()
        if loaded is None and not pretrained:
            raise KilnError("KilnLM needs pretrained=RUN (a run, a checkpoint directory or an export)")
        self.lm = loaded or load(pretrained, device, allow_pickle=allow_pickle in (True, "true", "True"), key="pretrained")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> the default
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.lm.device

    @property
    def max_length(self) -> int:
        return self.lm.model.cfg.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.source)

    def chat_template(self, chat_template: bool | str = False) -> str:
        fmt = self.lm.chat_format
        fmt.check_chat("KilnLM.chat_template")
        return fmt.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        fmt = self.lm.chat_format
        unknown = [m["role"] for m in chat_history if m["role"] not in ROLE_TOKENS]
        if unknown and fmt.own:
            raise KilnError(f"kiln's chat format has no role {unknown[0]!r}; use {', '.join(ROLE_TOKENS)}")
        return fmt.render_text(chat_history, add_generation_prompt)

    def _context(self, text: str) -> list[int]:
        """BOS + the text's ids (a chat-rendered context already starts with it); for a tokenizer
        without BOS, the text's ids alone (an empty text: the document separator)."""
        fmt, ids = self.lm.chat_format, self.lm.encode(text)
        if not fmt.starts_with_bos:
            return ids or [self.lm.bos]
        return ids if ids[:1] == [fmt.bos] else [fmt.bos, *ids]

    @property
    def eot_token_id(self) -> int:
        fmt = self.lm.chat_format
        return fmt.eos[0] if fmt.eos else self.lm.bos

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS, or for a tokenizer without one the document separator."""
        return self._context("")[0]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's ids, after BOS unless `add_special_tokens` is False (see `_context`)."""
        return self.lm.encode(string) if add_special_tokens is False else self._context(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per
        ((context, continuation), context ids, continuation ids); a context too long for the model
        keeps its last tokens."""
        windows = []
        for _, context_enc, continuation_enc in requests:
            cont = list(continuation_enc)[-self.max_length :]
            full = list(context_enc) + cont
            windows.append((full[:-1][-self.max_length :], cont))
        empty = [i for i, (_, cont) in enumerate(windows) if not cont]
        scored = score_windows(self.lm, [w for w in windows if w[1]], self.batch_size)
        out = iter(scored)
        results = [(0.0, True) if i in empty else next(out) for i in range(len(windows))]
        for (args, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text | <|bos|>) per request, in windows that predict every token once (see
        `kiln.eval.scoring.rolling_windows`)."""
        owners, windows = [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            for w in rolling_windows(self.lm.encode(text), self.lm.bos, self.max_length):
                owners.append(i)
                windows.append(w)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, score_windows(self.lm, windows, self.batch_size)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut before the first of its `until` strings (and ended by
        BOS / EOS) or at `max_gen_toks` tokens."""
        prompts, stops, budgets = [], [], []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            budget = max(1, min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            budgets.append(budget)
            prompts.append(self._context(context)[-(self.max_length - budget):])
        decode = self.lm.tokenizer.decode
        results = [""] * len(requests)
        for budget in sorted(set(budgets)):  # one generation call per budget
            rows = [i for i, b in enumerate(budgets) if b == budget]
            gens = greedy_generate(self.lm, [prompts[i] for i in rows], budget,
                                   lambda r, ids, rows=rows: any(u in decode(ids) for u in stops[rows[r]]),
                                   self.batch_size)
            for i, (ids, _) in zip(rows, gens):
                text = decode(ids)
                cut = min((text.find(u) for u in stops[i] if u and u in text), default=len(text))
                results[i] = text[:cut]
        for req, text in zip(requests, results):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results


def run_harness(lm: Loaded, tasks: list[str], include: str = "", limit: int = 0, batch_size: int = 8) -> dict:
    """Run lm-evaluation-harness tasks on a loaded model; returns {task: {metric: value}}. With
    `include`, tasks defined there are found without indexing the harness's own thousands."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include:
        manager = TaskManager(include_path=include, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = TaskManager(include_path=include)
    else:
        manager = TaskManager()
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise KilnError(f"eval.harness_tasks: lm-eval knows no task {unknown[0]!r}; list them with `lm_eval ls tasks`"
                        + (f" or check the YAML files in {include}" if include else ""))
    results = simple_evaluate(model=KilnLM(loaded=lm, batch_size=batch_size), tasks=list(tasks), task_manager=manager,
                              limit=limit or None, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in results["results"].items()}
