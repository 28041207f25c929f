"""How a run's model reads conversations: one `ChatFormat` per run, used by every verb that renders
chat (SFT, reward, DPO, RL prompts, generation, serving, labelling, evaluation).

Two kinds, chosen by what lies beside the run's tokenizer:

- **kiln's own format** (a tokenizer `kiln prepare` trained: no `chat.json` beside it). A
  conversation renders as

      <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

  Each role's content is tokenized on its own between the special tokens, which is exactly what a
  Hugging Face tokenizer does with the rendered string (special tokens split the text first), so
  kiln and `transformers` produce the same ids (`CHAT_TEMPLATE` is the same format in Jinja).
- **an imported model's own template** (`kiln import` writes `tokenizer/chat.json` and
  `tokenizer/chat_template.jinja`): the tokenizer stays exactly as the model was trained with it,
  and a conversation is rendered by its Jinja template as `transformers`' `apply_chat_template`
  renders it (a sandboxed environment with `trim_blocks`/`lstrip_blocks`, `raise_exception`,
  `strftime_now`, a `tojson` that does not escape HTML, the tokenizer's `bos_token`/`eos_token`/...,
  `add_generation_prompt`), then tokenized with no special tokens added.

Only assistant content and its end-of-turn token carry a loss; every other turn is context
(labels -100). With a template, the assistant's tokens are the template's `{% generation %}`
blocks when it has them, else found by rendering the conversation turn by turn: a reply starts
where the conversation before it, rendered with the generation prompt, ends, and runs to its
first end-of-turn token.
"""

from __future__ import annotations

import json
import re
import shutil
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kiln.data.tokenizer import ASSISTANT, BOS, END, EOS, PAD, SYSTEM, USER
from kiln.errors import KilnError

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# Workloads whose checkpoints answer chat turns: what `chat=auto` reads (generate, label, rl's prompts).
CHAT_WORKLOADS = ("sft", "dpo", "rl")
# Other names clients and datasets give a role (OpenAI's `developer` is its newer name for `system`).
ROLE_ALIASES = {"developer": "system"}
IGNORE = -100

# The same format for `transformers` (tokenizer_config.json's chat_template).
# Roles as check_messages reads them: `developer` is written as `system`, any other role refused.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'system' if message['role'] == 'developer' else message['role'] %}"
    "{% if role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + role + '; use one of system, user, assistant, developer') }}"
    "{% endif %}"
    "{{ '<|' + role + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Beside a run's tokenizer.json: what `kiln import` records (kiln's own runs have neither file),
# and the model's original Hugging Face files that `kiln export` writes back unchanged.
FORMAT_FILE = "chat.json"
TEMPLATE_FILE = "chat_template.jinja"
SOURCE_DIR = "hf"


def check_messages(messages, where: str = "conversation") -> list[dict]:
    """A list of {role, content} with known roles and non-empty text, or a one-line error naming what
    is wrong. A role's other name (`developer`) is written as kiln's (`system`), in place."""
    if not isinstance(messages, list) or not messages:
        raise KilnError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise KilnError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] in ROLE_ALIASES:
            m["role"] = ROLE_ALIASES[m["role"]]
        if m["role"] not in ROLE_TOKENS:
            raise KilnError(f"{where}: message {i} has unknown role {m['role']!r}; use one of "
                            f"{', '.join([*ROLE_TOKENS, *ROLE_ALIASES])}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise KilnError(f"{where}: message {i} ({m['role']}) has empty or non-text content")
    return messages


@dataclass
class Rendered:
    ids: list[int]
    labels: list[int]  # the id where the token carries a loss, IGNORE elsewhere


@dataclass(frozen=True, eq=False)
class ChatFormat:
    """A run's tokenizer with what kiln needs to know about it: the ids that start and end documents
    and turns, the padding id, and how conversations render (kiln's format or the model's template).

    Every caller asks this object instead of looking special tokens up by name: `bos` (None for a
    tokenizer without one, as Qwen's), `eos` (end a document: generation_config.json's EOS ids),
    `end` (end a chat turn), `stop_ids` (what generation stops at), `pad`, `text_ids` (a plain-text
    prompt), `render` / `prompt_ids` / `render_text` (a conversation)."""

    tokenizer: object
    own: bool  # kiln's format, rendered by kiln's code; else a Hugging Face model's template
    bos: int | None
    eos: tuple[int, ...]
    end: tuple[int, ...]
    pad: int | None
    template: str | None = None  # the model's Jinja template (None: kiln's own, or a model that has none)
    tokens: dict = field(default_factory=dict)  # the template's special-token variables (bos_token, ...)
    add_bos: bool = True  # whether a plain text starts with `bos` (what the tokenizer's post-processor does)
    source: str = ""  # where the template came from, for the errors

    @classmethod
    def kiln(cls, tokenizer) -> ChatFormat:
        """kiln's own format over a tokenizer `kiln prepare` trained (ids looked up once, here)."""
        def tid(t):
            return tokenizer.token_to_id(t)

        return cls(tokenizer, True, tid(BOS), tuple(i for i in (tid(EOS),) if i is not None),
                   tuple(i for i in (tid(END),) if i is not None), tid(PAD), tokens={"bos_token": BOS})

    @classmethod
    def from_record(cls, tokenizer, record: dict, template: str | None) -> ChatFormat:
        """An imported model's format from its `chat.json` record and template."""
        try:
            return cls(tokenizer, False, record["bos"], tuple(record["eos"]), tuple(record["end"]), record["pad"],
                       template, dict(record.get("tokens") or {}), bool(record.get("add_bos", record["bos"] is not None)),
                       str(record.get("source", "")))
        except (KeyError, TypeError) as e:
            raise KilnError(f"{FORMAT_FILE} lacks or garbles {e}; import the model again") from None

    def record(self) -> dict:
        """What `chat.json` holds for an imported model (its template lies beside it)."""
        return {"bos": self.bos, "eos": list(self.eos), "end": list(self.end), "pad": self.pad,
                "tokens": dict(self.tokens), "add_bos": self.add_bos, "source": self.source}

    # ---- ids ----------------------------------------------------------------------------------------
    @property
    def stop_ids(self) -> set[int]:
        """Tokens that end a generation: a new document begins, a document or a chat turn ends."""
        return {i for i in (self.bos, *self.eos, *self.end) if i is not None}

    @property
    def starts_with_bos(self) -> bool:
        """Whether the model's documents and plain-text prompts start with `bos`."""
        return self.bos is not None and (self.own or self.add_bos)

    @property
    def document_start(self) -> int | None:
        """The token every document starts after: BOS, or for a tokenizer that adds none (Qwen's) the
        EOS that ends the document before it."""
        if self.starts_with_bos:
            return self.bos
        return self.eos[0] if self.eos else self.bos

    def text_ids(self, text: str) -> list[int]:
        """A plain text as a prompt, as the model's tokenizer gives it: after BOS where the model's
        documents start with one (an empty text, for a model without, is the document start alone)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.starts_with_bos:
            return [self.bos, *ids]
        return ids or [i for i in (self.document_start,) if i is not None]

    def special_token_texts(self) -> list[str]:
        """The spellings of the tokenizer's special tokens (what a prompt must not smuggle in)."""
        decoder = getattr(self.tokenizer, "get_added_tokens_decoder", None)
        return sorted({t.content for t in decoder().values() if t.special}) if decoder else []

    # ---- conversations ------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The Jinja template that renders this format (kiln's: `CHAT_TEMPLATE`)."""
        return CHAT_TEMPLATE if self.own else self.template

    def check_chat(self, where: str) -> None:
        """A one-line error when this format cannot render a conversation."""
        if self.own:
            missing = [t for t in (BOS, PAD, SYSTEM, USER, ASSISTANT, END) if self.tokenizer.token_to_id(t) is None]
            if missing:
                raise KilnError(f"{where}: the tokenizer lacks the chat tokens {', '.join(missing)}; use a tokenizer "
                                "trained by `kiln prepare`")
        elif not self.template:
            raise KilnError(f"{where}: the imported model has no chat template (no chat_template in "
                            f"{self.source or 'its tokenizer_config.json'}, no chat_template.jinja), so kiln cannot "
                            "render a conversation for it; import a model that has one")

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               train_on: str = "assistant") -> Rendered:
        """Token ids and labels of a conversation. `train_on="assistant"` puts the loss on every
        assistant turn (its tokens and its end-of-turn token); "last" only on the final assistant
        turn; "all" on every content token (kiln's format) or every token (a template)."""
        if self.own:
            return _render_own(self.tokenizer, messages, add_generation_prompt, train_on)
        self.check_chat("chat")
        return self._render_template(messages, add_generation_prompt, train_on)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation ready for the assistant's reply (generation and serving): what
        `transformers`' `apply_chat_template(messages, add_generation_prompt=True)` gives."""
        if self.own:
            return _render_own(self.tokenizer, messages, True, "assistant").ids
        self.check_chat("chat")
        return self.tokenizer.encode(self._text(messages, True), add_special_tokens=False).ids

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as one string with the special tokens spelled out (what the template renders)."""
        if self.own:
            return render_text(messages, add_generation_prompt)
        self.check_chat("chat")
        return self._text(messages, add_generation_prompt)

    def turn_end(self) -> int | None:
        """The special token the template closes an assistant turn with (ChatML's <|im_end|>, Llama
        3's <|eot_id|>), found by rendering a short conversation; None if it closes with none."""
        if self.own:
            return self.tokenizer.token_to_id(END)
        if not self.template:
            return None
        reply = "kiln probe reply"
        try:
            text = self._text([{"role": "user", "content": "kiln probe"}, {"role": "assistant", "content": reply}],
                              False)
        except KilnError:
            return None
        at = text.find(reply)
        if at < 0:
            return None
        special = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        tail = self.tokenizer.encode(text[at + len(reply):], add_special_tokens=False).ids
        return next((i for i in tail if i in special), None)

    def describe(self) -> str:
        """One line: where the template came from, and the ids that start, end and pad."""
        def spell(ids) -> str:
            return ", ".join(f"{self.tokenizer.id_to_token(i)} ({i})" for i in ids) or "none"

        tmpl = "kiln's chat format" if self.own else (f"chat template from {self.source}" if self.template
                                                      else "no chat template (chat verbs refuse this model)")
        return (f"{tmpl}; BOS {spell([self.bos] if self.bos is not None else [])}; EOS {spell(self.eos)}; "
                f"end of turn {spell(self.end[:1])}; "
                f"pad {spell([self.pad] if self.pad is not None else [])}")

    # ---- the template -------------------------------------------------------------------------------
    def _text(self, messages: list[dict], add_generation_prompt: bool, mark: bool = False) -> str:
        compiled = _compiled(self.template, self.source)
        token = _MARKING.set(mark)
        try:
            return compiled.render(**self.tokens, messages=[dict(m) for m in messages], tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt)
        except Exception as e:  # raise_exception, undefined names, the sandbox, errors in the template's own code
            first = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise KilnError(f"the chat template ({self.source or 'the run'}) refused the conversation: {first}") from None
        finally:
            _MARKING.reset(token)

    def _render_template(self, messages: list[dict], add_generation_prompt: bool, train_on: str) -> Rendered:
        if _GENERATION.search(self.template):
            text, spans = _unmark(self._text(messages, add_generation_prompt, mark=True))
        else:
            text = self._text(messages, add_generation_prompt)
            spans = self._turn_spans(messages, text)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = list(enc.ids), enc.offsets
        if train_on == "all":
            return Rendered(ids, list(ids))
        labels = [IGNORE] * len(ids)
        ends = set(self.end)
        for a, b in spans if train_on == "assistant" else spans[-1:]:
            k = next((k for k, (s, e) in enumerate(offsets) if e > a and e > s), len(ids))
            closed = False
            while k < len(ids) and offsets[k][0] < b:
                labels[k] = ids[k]
                k += 1
                if ids[k - 1] in ends:
                    closed = True
                    break
            if not closed and k < len(ids) and ids[k] in ends:  # a marked reply whose end-of-turn follows it
                labels[k] = ids[k]
        return Rendered(ids, labels)

    def _turn_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """(start, bound) characters of each assistant reply in `text`, by rendering the conversation
        turn by turn: a reply starts where the turns before it, with the generation prompt, end."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            try:
                before = self._text(messages[:i], True) if i else ""
            except KilnError:
                before = ""
            if not text.startswith(before):
                raise KilnError(f"the chat template ({self.source or 'the run'}) renders the conversation before "
                                f"assistant turn {i} differently once later turns follow, so kiln cannot tell which "
                                "tokens are the assistant's: mark replies with {% generation %} … {% endgeneration %} "
                                "in the template")
            upto = self._text(messages[: i + 1], False)
            bound = len(upto) if text.startswith(upto) and len(upto) > len(before) else len(text)
            spans.append((len(before), bound))
        return spans


def as_format(fmt) -> ChatFormat:
    """A ChatFormat as is; a bare tokenizer (one `kiln prepare` trained) as kiln's format over it."""
    return fmt if isinstance(fmt, ChatFormat) else ChatFormat.kiln(fmt)


def render(fmt, messages: list[dict], add_generation_prompt: bool = False, train_on: str = "assistant") -> Rendered:
    """`fmt.render(...)` for a ChatFormat or a bare kiln tokenizer (`as_format`)."""
    return as_format(fmt).render(messages, add_generation_prompt, train_on)


def prompt_ids(fmt, messages: list[dict]) -> list[int]:
    """Ids of a conversation ready for the assistant's reply (generation and serving)."""
    return as_format(fmt).prompt_ids(messages)


def _render_own(tokenizer, messages: list[dict], add_generation_prompt: bool, train_on: str) -> Rendered:
    ids = [tokenizer.token_to_id(BOS)]
    labels = [IGNORE]
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(messages):
        role = tokenizer.token_to_id(ROLE_TOKENS[m["role"]])
        body = tokenizer.encode(m["content"], add_special_tokens=False).ids + [tokenizer.token_to_id(END)]
        learn = (train_on == "all" or (train_on == "assistant" and m["role"] == "assistant")
                 or (train_on == "last" and i == last_assistant))
        ids += [role, *body]
        labels += [IGNORE, *(body if learn else [IGNORE] * len(body))]
    if add_generation_prompt:
        ids.append(tokenizer.token_to_id(ASSISTANT))
        labels.append(IGNORE)
    return Rendered(ids, labels)


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation in kiln's format as one string with the special tokens spelled out (what
    CHAT_TEMPLATE renders)."""
    text = BOS + "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


def speaks_chat(info: dict) -> bool:
    """Whether a checkpoint (its checkpoint.json) was trained to answer in its chat format: written
    by a chat workload, or carrying `chat: true` (a quantized copy of one)."""
    return info.get("workload") in CHAT_WORKLOADS or info.get("chat") is True


def chat_messages(prompt: str, system: str = "") -> list[dict]:
    """A one-turn conversation (with an optional system message), checked."""
    return check_messages([*([{"role": "system", "content": system}] if system else []),
                           {"role": "user", "content": prompt}], "prompt")


# ---- where a run keeps its format ----------------------------------------------------------------------
def read_format(tokenizer_file: str | Path, tokenizer=None) -> ChatFormat:
    """The format of the tokenizer at `tokenizer_file` (a tokenizer.json or its directory): the
    imported model's when `chat.json` lies beside it, else kiln's."""
    path = Path(tokenizer_file)
    where = path if path.is_dir() else path.parent
    if tokenizer is None:
        from kiln.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    record_file = where / FORMAT_FILE
    if not record_file.is_file():
        return ChatFormat.kiln(tokenizer)
    try:
        record = json.loads(record_file.read_text())
        name = record.get("template")
        template = (where / TEMPLATE_FILE).read_text(encoding="utf-8") if name else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise KilnError(f"{record_file} (or its {TEMPLATE_FILE}) cannot be read ({str(e).splitlines()[0]}); "
                        "import the model again") from None
    return ChatFormat.from_record(tokenizer, record, template)


def write_format(directory: Path, record: dict, template: str | None) -> None:
    """Write an imported model's `chat.json` (and its template) into a run's tokenizer directory."""
    from kiln.runs import write_json

    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / FORMAT_FILE, {**record, "template": TEMPLATE_FILE if template else None})
    if template:
        (directory / TEMPLATE_FILE).write_text(template, encoding="utf-8")


def copy_format(tokenizer_file: str | Path, directory: Path) -> None:
    """Copy what lies beside a tokenizer.json (an imported model's chat.json, template and original
    files) into `directory`, where a copy of that tokenizer.json goes; nothing for kiln's own."""
    src = Path(tokenizer_file)
    src = src if src.is_dir() else src.parent
    if src.resolve() == Path(directory).resolve() or not (src / FORMAT_FILE).is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    for name in (FORMAT_FILE, TEMPLATE_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, directory / name)
    if (src / SOURCE_DIR).is_dir():
        shutil.copytree(src / SOURCE_DIR, directory / SOURCE_DIR, dirs_exist_ok=True)


# ---- rendering Jinja as transformers does --------------------------------------------------------------
# `{% generation %}` blocks, when the caller asks for them, come back wrapped in two Unicode
# noncharacters (reserved for internal use, never in text): their places are the assistant's spans.
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_MARKING: ContextVar[bool] = ContextVar("kiln_chat_marking", default=False)


def _unmark(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without the marks, and the (start, end) characters each marked block spans."""
    out, spans, start, n = [], [], None, 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece == _OPEN:
            start = n
        elif piece == _CLOSE:
            if start is not None and n > start:
                spans.append((start, n))
            start = None
        else:
            out.append(piece)
            n += len(piece)
    return "".join(out), spans


@lru_cache(maxsize=1)
def _environment():
    """A sandboxed Jinja environment set up as `transformers` sets up the one it renders chat
    templates in (the same whitespace control, globals and filters)."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise KilnError("rendering a model's chat template needs jinja2: pip install 'jinja2>=3.1.6'") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body; marked when asked."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            text = caller()
            return f"{_OPEN}{text}{_CLOSE}" if _MARKING.get() else text

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names (no reaching into Python's internals)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            values = dict(*rest, **kwargs)
            for name in values:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, values)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace,
                       dict=lambda *a, **k: dict(*a, **k))
    return env


@lru_cache(maxsize=16)
def _compiled(template: str, source: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise KilnError(f"the chat template ({source or 'the run'}) is not valid Jinja (line {e.lineno}: {e.message})") from None
