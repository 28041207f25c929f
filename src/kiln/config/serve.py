"""Using a model: `sample.*` (`kiln generate`), `serve.*` (the HTTP API) and `label.*` (human preference labelling)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kiln.config.schema import ranged


@dataclass
class SampleConfig:
    prompt: str = "def "
    max_new_tokens: int = ranged(64, ge=1)
    temperature: float = ranged(0.8, ge=0)  # 0 = greedy
    top_k: int = ranged(50, ge=0)  # 0 = off
    top_p: float = ranged(1.0, gt=0, le=1)  # 1 = off
    repetition_penalty: float = ranged(1.0, gt=0)  # > 1 discourages tokens already in the prompt or output
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    seed: int = ranged(0, ge=0)
    num_samples: int = ranged(1, ge=1)
    # `kiln generate`: the prompt as the user's turn of kiln's chat format, the reply as the assistant's;
    # auto = on for a run trained on conversations (sft, dpo, rl, or a quantized copy of one)
    chat: Literal["auto", "on", "off"] = "auto"
    system: str = ""  # chat: a system message before the prompt
    # token healing of a text prompt: its last token backed off and the first new token made to extend
    # its text (a prompt ending in "\n" may go on with "\n    "); chat prompts are never healed
    heal: bool = True
    report_prompts: list[str] = field(
        default_factory=lambda: ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self"]
    )


@dataclass
class ServeConfig:
    """`kiln serve`: an OpenAI-compatible HTTP API over the continuous-batching engine."""

    host: str = "127.0.0.1"  # any other address needs an API key
    port: int = ranged(8000, ge=0, le=65535)  # 0 = a free port (printed at start)
    api_key: str = ""  # required off loopback; "" = the KILN_API_KEY environment variable, if set
    model_name: str = ""  # the model id clients ask for; "" = the run directory's name
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on CUDA, fp32 elsewhere
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the decode step; auto = on for CUDA only
    max_batch: int = ranged(16, ge=1)  # sequences decoding together (rows of the KV cache)
    max_queue: int = ranged(256, ge=0)  # sequences waiting for a row; beyond that, 429
    max_prompt_tokens: int = ranged(0, ge=0)  # 0 = the model's context less one
    max_new_tokens: int = ranged(1024, ge=1)  # the largest max_tokens a request may ask for
    max_total_tokens: int = ranged(8192, ge=1)  # the largest n × max_tokens of one request
    max_n: int = ranged(8, ge=1)  # choices per request (prompts × n)
    # keys and values of recent prompt prefixes (32-token blocks, least recently used out first), so a
    # request that begins like a recent one (a common system prompt) prefills only the rest; 0 = off
    prefix_cache_mb: float = ranged(64.0, ge=0)
    # speculative decoding: a small model of the same tokenizer (the student `kiln distill` made of this
    # run) drafts `draft_tokens` tokens that the served model checks in one forward; "" = off
    draft: str = ""
    draft_tokens: int = ranged(3, ge=1, le=16)  # tokens drafted per round (k); rounds run only while they beat plain steps
    # streaming: the text of the tokens made within this long goes out in one write (the first token and
    # a choice's end at once); 0 = a write per token
    stream_interval_ms: float = ranged(10.0, ge=0, le=1000)
    max_streams_per_key: int = ranged(64, ge=1)  # requests in flight per API key (or client address)
    max_body_bytes: int = ranged(1_000_000, ge=1)  # a larger request body is refused (413)
    max_json_depth: int = ranged(32, ge=1)  # JSON nested deeper is refused (400)
    read_timeout_s: float = ranged(10.0, gt=0)  # a request's head and body must arrive within this
    max_connections: int = ranged(1000, ge=1)  # open connections; beyond that, 503
    shutdown_timeout_s: float = ranged(30.0, ge=0)  # graceful shutdown: time left to requests in flight
    usd_per_hour: float = ranged(0.0, ge=0)  # the machine's price, for cost per million tokens; 0 = assumed
    heal: bool = True  # token healing of text prompts (as sample.heal); token-id and chat prompts are taken as sent


@dataclass
class LabelConfig:
    """`kiln label generate | serve | invite | report | export`: human preference labelling."""

    db: str = ""  # the label database (SQLite); "" = <out>/labels/labels.db
    prompts: str = ""  # prompts for `generate`: .jsonl with a "prompt" field, or text, one a line; "" = sample.report_prompts
    pairs_per_prompt: int = ranged(1, ge=1)  # pairs of completions `generate` samples per prompt
    chat: Literal["auto", "on", "off"] = "auto"  # prompt as a user turn, reply as the assistant; auto = on for sft/dpo/rl runs
    labellers: list[str] = field(default_factory=list)  # names `generate` invites (one link each)
    name: str = ""  # the labeller `invite` adds (or whose link it renews)
    labellers_per_pair: int = ranged(1, ge=1)  # how many labellers see each pair; 2+ gives agreement (kappa)
    host: str = "127.0.0.1"  # `serve` binds here; any other address needs label.admin_key
    port: int = ranged(8765, ge=0, le=65535)  # 0 = any free port (the address is printed)
    url: str = ""  # the address labellers open, for invite links; "" = http://host:port
    admin_key: str = ""  # admin token for the report/export views; "" = a fresh one per `serve` (loopback only)
    output: str = ""  # the preference JSONL `export` writes; "" = <out>/labels/preferences.jsonl
    lease_s: float = ranged(600.0, gt=0)  # a pair shown to a labeller is held for them this long
    busy_timeout_s: float = ranged(5.0, ge=0)  # wait this long for a locked database before answering "busy"
