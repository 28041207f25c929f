"""The one chat format kiln uses everywhere: training (SFT, reward, DPO, RL), generation, serving
and the Hugging Face export (`CHAT_TEMPLATE`, the same format as a Jinja template).

A conversation renders as

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

Each role's content is tokenized on its own between the special tokens, which is exactly what a
Hugging Face tokenizer does with the rendered string (special tokens split the text first), so
kiln and `transformers` produce the same ids. Only assistant content and its closing `<|end|>`
carry a loss; the role markers and every other turn are context (labels -100).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.data.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER
from kiln.errors import KilnError

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# Workloads whose checkpoints answer chat turns: what `chat=auto` reads (generate, label, rl's prompts).
CHAT_WORKLOADS = ("sft", "dpo", "rl")
# Other names clients and datasets give a role (OpenAI's `developer` is its newer name for `system`).
ROLE_ALIASES = {"developer": "system"}
IGNORE = -100

# The same format for `transformers` (tokenizer_config.json's chat_template).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


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


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, train_on: str = "assistant") -> Rendered:
    """Token ids and labels of a conversation. `train_on="assistant"` puts the loss on every
    assistant turn (content + its <|end|>); "last" only on the final assistant turn; "all" on
    every content token."""
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
    """The conversation as one string with the special tokens spelled out (what CHAT_TEMPLATE renders)."""
    text = BOS + "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


def speaks_chat(info: dict) -> bool:
    """Whether a checkpoint (its checkpoint.json) was trained to answer in this format: written by
    a chat workload, or carrying `chat: true` (a quantized copy of one)."""
    return info.get("workload") in CHAT_WORKLOADS or info.get("chat") is True


def chat_messages(prompt: str, system: str = "") -> list[dict]:
    """A one-turn conversation (with an optional system message), checked."""
    return check_messages([*([{"role": "system", "content": system}] if system else []),
                           {"role": "user", "content": prompt}], "prompt")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of a conversation ready for the assistant's reply (generation and serving)."""
    return render(tokenizer, messages, add_generation_prompt=True).ids
