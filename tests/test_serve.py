"""Serving: continuous batching in the engine, and `kiln serve`'s OpenAI-compatible API driven by the
official `openai` client and raw HTTP against live servers on 127.0.0.1: streaming, concurrency, limits,
bad input, API keys, a bounded attack loop, disconnects, and a graceful stop of the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from kiln.config import Config, SampleConfig, ServeConfig
from kiln.data.chat import prompt_ids
from kiln.errors import KilnError
from kiln.infer.engine import SamplingParams, Sequence
from kiln.infer.generate import Engine
from kiln.serve.api import Server, resolve_api_key
from kiln.serve.measure import measure_serving
from kiln.serve.scheduler import QueueFull, Scheduler

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["def f(x):", "import os\nimport sys\n", "class Stack:\n    def __init__(self", "x = 1",
           "for i in range(10):\n    print(i)\n" * 3, "# a comment", "return None", "if __name__ =="]


@pytest.fixture(scope="module")
def engine(tiny_run):
    return Engine.from_run(tiny_run, "cpu")


def greedy(engine: Engine, prompt: str, n: int, heal: bool = True) -> str:
    (text,) = engine.generate(prompt, SampleConfig(prompt=prompt, max_new_tokens=n, temperature=0.0, heal=heal))
    return text


def run_alone(engine: Engine, prompt: list[int], params: SamplingParams) -> Sequence:
    batch = engine.new_batch(1)
    seq = Sequence(prompt, params, engine.tokenizer)
    batch.add([seq])
    while batch.running:
        batch.step()
    return seq


def serve(engine: Engine, **limits) -> Server:
    sv = ServeConfig(**{"port": 0, "max_batch": 4, "max_queue": 64, "max_new_tokens": 64, "max_total_tokens": 200,
                        "max_n": 4, "max_body_bytes": 65536, "read_timeout_s": 5.0, **limits})
    return Server(engine, sv, "tiny")


@pytest.fixture(scope="module")
def server(engine):
    with serve(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# ---- the engine ------------------------------------------------------------------------------
def test_continuous_batching_gives_each_request_what_it_gets_alone(engine):
    """Requests of different lengths join a running batch of 3 rows mid-decode and leave as they
    finish; each one's greedy tokens are exactly those it gets decoding alone."""
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    alone = [run_alone(engine, engine.encode_prompt(p), params).tokens for p in PROMPTS]
    with Scheduler(engine, max_batch=3, max_queue=16) as sched:
        seqs = []
        for p in PROMPTS:
            seqs.append(Sequence(engine.encode_prompt(p), params, engine.tokenizer))
            sched.submit(seqs[-1:])
            time.sleep(0.005)
        assert sched.wait(seqs, 60)
        assert sched.running == 0 and sched.queue_depth == 0
    assert [s.tokens for s in seqs] == alone
    assert all(s.ttft_s > 0 and s.latency_s >= s.ttft_s for s in seqs)


def test_a_seeded_sample_is_the_same_alone_and_in_a_busy_batch(engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    alone = run_alone(engine, engine.encode_prompt("def "), params)
    with Scheduler(engine, max_batch=4, max_queue=8) as sched:
        others = [Sequence(engine.encode_prompt(p), SamplingParams(max_new_tokens=20, temperature=0.8),
                           engine.tokenizer) for p in PROMPTS[:3]]
        mine = Sequence(engine.encode_prompt("def "), params, engine.tokenizer)
        sched.submit(others[:2])
        sched.submit([mine])
        sched.submit(others[2:])
        assert sched.wait([mine, *others], 60)
    assert mine.tokens == alone.tokens
    other_seed = run_alone(engine, engine.encode_prompt("def "), SamplingParams(20, 1.0, 40, 0.9, seed=8))
    assert other_seed.tokens != alone.tokens


def test_a_stop_string_ends_generation_and_never_streams(engine):
    full = greedy(engine, PROMPTS[4], 40, heal=False)  # as the sequences below: token healing off
    stop = full[6:9]
    assert len(stop) == 3 and full.find(stop) >= 0
    pieces = []
    seq = run_alone(engine, engine.encode_prompt(PROMPTS[4]),
                    SamplingParams(max_new_tokens=40, temperature=0.0, stop=("\x00never", stop)))
    seq2 = Sequence(engine.encode_prompt(PROMPTS[4]), SamplingParams(40, 0.0, stop=(stop,)), engine.tokenizer,
                    listener=lambda s, t: pieces.append(t))
    batch = engine.new_batch(1)
    batch.add([seq2])
    while batch.running:
        batch.step()
    assert seq.text == full[: full.find(stop)] == "".join(pieces)
    assert seq.finish_reason == "stop" and seq2.finish_reason == "stop"


def test_a_repetition_penalty_repeats_fewer_tokens(engine):
    prompt = engine.encode_prompt("import os\n" * 6)
    plain = run_alone(engine, prompt, SamplingParams(max_new_tokens=40, temperature=0.0)).tokens
    penalized = run_alone(engine, prompt, SamplingParams(max_new_tokens=40, temperature=0.0,
                                                         repetition_penalty=50.0)).tokens
    assert len(plain) - len(set(plain)) > 5  # the precondition: plain greedy decoding repeats itself
    assert len(penalized) - len(set(penalized)) < len(plain) - len(set(plain))


def test_the_queue_refuses_what_it_cannot_hold_and_cancel_frees_rows(engine):
    long = SamplingParams(max_new_tokens=64, temperature=0.0)  # PROMPTS[3] runs all 64 (checked below)
    with Scheduler(engine, max_batch=1, max_queue=1) as sched:
        a, b, c = (Sequence(engine.encode_prompt(PROMPTS[3]), long, engine.tokenizer) for _ in range(3))
        sched.submit([a])
        sched.submit([b])
        with pytest.raises(QueueFull, match="queue is full"):
            sched.submit([c])
        sched.cancel([a, b])
        assert sched.wait([a, b], 10)
        assert sched.running == 0 and sched.queue_depth == 0
    assert a.finish_reason == b.finish_reason == "cancelled" and len(a.tokens) < 64


def test_measure_serving_reports_latency_and_cost(tiny_run):
    cfg = Config(device="cpu", sample=SampleConfig(max_new_tokens=8), serve=ServeConfig(usd_per_hour=3.6))
    m = measure_serving(tiny_run, cfg)
    assert m["queries"] == 3 and 0 < m["ttft_s"] <= m["latency_s"]
    assert m["batched_tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0
    assert m["usd_per_query"] == pytest.approx(m["latency_s"] / 1000)  # $3.6/hour = $0.001/second
    assert m["usd_per_million_tokens"] == pytest.approx(1e9 / m["batched_tokens_per_s"] / 1e6)


def test_the_server_starts_and_answers_when_the_decode_step_cannot_compile(tiny_run, http, monkeypatch, capfd):
    """`serve.compile=on` where compiling fails (on CUDA: a host with pip wheels only, no toolkit
    for a C++ wrapper's build): the server starts, decodes eagerly and says so once."""
    import torch

    def broken(fn=None, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("InductorError: CUDA_HOME environment variable is not set")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    fresh = Engine.from_run(tiny_run, "cpu")  # its own decode step, not the module's engine's
    want = greedy(fresh, "def f(x):", 8)
    with serve(fresh, compile="on") as srv:
        r = http.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "def f(x):", "max_tokens": 8,
                                                          "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    err = capfd.readouterr().err
    assert err.count("decoding eagerly") == 1 and "CUDA_HOME" in err


# ---- the API with the openai client ----------------------------------------------------------
def test_models_lists_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == "tiny" and model.owned_by == "kiln"


def test_completion_matches_the_engine_and_counts_usage(client, engine):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == greedy(engine, PROMPTS[0], 12)
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(engine.encode_prompt(PROMPTS[0]))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens and 0 < r.usage.completion_tokens <= 12


def test_token_id_prompts_are_taken_as_sent_and_text_prompts_get_bos(client, engine):
    """One rule (docs/serving.md): a text prompt starts with BOS where the model's documents do; token
    ids are the client's own tokenization (lm-eval sends them), used exactly as sent, BOS or not."""
    bos = engine.chat_format.bos
    with_bos = engine.encode_prompt(PROMPTS[0])
    assert with_bos[0] == bos and bos not in with_bos[1:]
    ask = dict(model="tiny", max_tokens=8, temperature=0)
    text = client.completions.create(prompt=PROMPTS[0], **ask)
    same = client.completions.create(prompt=with_bos, **ask)
    bare = client.completions.create(prompt=with_bos[1:], **ask)
    assert same.choices[0].text == text.choices[0].text and same.usage.prompt_tokens == text.usage.prompt_tokens
    assert bare.usage.prompt_tokens == len(with_bos) - 1  # no BOS added to ids
    assert bare.choices[0].text == run_alone(engine, with_bos[1:], SamplingParams(8, temperature=0.0)).text


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_uses_the_chat_format_and_streams(client, engine):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A stack class"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(prompt_ids(engine.tokenizer, messages))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_choices_with_a_seed_are_reproducible_and_distinct(client):
    ask = dict(model="tiny", prompt="def ", max_tokens=16, temperature=1.0, n=3, seed=11)
    a, b = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1 and sorted(c.index for c in a.choices) == [0, 1, 2]


def test_many_concurrent_clients_each_get_their_own_answer(client, engine, server):
    """16 clients (streaming and not) on a batch of 4 rows: continuous batching under load."""
    want = {p: greedy(engine, p, 24) for p in PROMPTS}

    def ask(i: int) -> tuple[str, str]:
        p = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            chunks = client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True)
            return p, "".join(c.choices[0].text for c in chunks)
        return p, client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text

    before = server.state.scheduler.ttft.count
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert all(text == want[p] for p, text in got)
    metrics = httpx.get(server.url + "/metrics").text
    assert "kiln_queue_depth 0" in metrics and "kiln_running_sequences 0" in metrics
    assert server.state.scheduler.ttft.count == before + 16
    assert 'kiln_time_to_first_token_seconds_bucket{le="+Inf"}' in metrics and "kiln_tokens_per_second" in metrics


def test_harmless_openai_fields_are_accepted_and_change_nothing(client):
    """Fields clients and agent frameworks send that mean nothing to a local model are accepted;
    a field that would change the answer is still refused."""
    messages = [{"role": "user", "content": "A stack class"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    harmless = dict(store=False, metadata={"run": "ci"}, service_tier="auto", user="u-1", prompt_cache_key="k",
                    safety_identifier="s-1", stream_options={"include_usage": True, "include_obfuscation": False})
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 parallel_tool_calls=True, modalities=["text"], stream=True,
                                                 **harmless))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    done = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                     extra_body={k: v for k, v in harmless.items() if k != "stream_options"})
    assert done.choices[0].text == client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8,
                                                              temperature=0).choices[0].text
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, reasoning_effort="high")
    with pytest.raises(openai.BadRequestError, match="modalities"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, modalities=["audio"])


def model_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i ≥ 1 and each position's full distribution, from one plain forward."""
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0, :-1, : engine.tokenizer.get_vocab_size()], -1)
    return logp


def test_completion_logprobs_and_echo_have_openais_legacy_shape(client, engine):
    """`echo` with `logprobs` and `max_tokens` 0 or 1 (how lm-eval's local-completions scores a
    server): the prompt's tokens with their log-probabilities, the first without one."""
    ids = engine.encode_prompt(PROMPTS[2])
    logp = model_logprobs(engine, ids)
    want = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    for max_tokens in (0, 1):
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0, echo=True,
                                      logprobs=2)
        (c,) = r.choices
        lp = c.logprobs
        n = len(ids) + max_tokens
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), want, atol=1e-4)
        tops = zip(lp.top_logprobs[1:], lp.token_logprobs[1:])
        assert all(len(t) <= 2 and max(t.values()) >= v - 1e-6 for t, v in tops)
        assert c.text.startswith(engine.tokenizer.decode(ids)) and r.usage.prompt_tokens == len(ids)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    greedy_text = greedy(engine, PROMPTS[2], 1)
    assert c.text == engine.tokenizer.decode(ids) + greedy_text
    assert max(lp.top_logprobs[-1], key=lp.top_logprobs[-1].get) == lp.tokens[-1]  # greedy: the top token
    text = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4, temperature=0, logprobs=1)
    (c,) = text.choices
    assert "".join(c.logprobs.tokens) == c.text and c.logprobs.text_offset[0] == len(PROMPTS[2])
    assert all(v is not None and v <= 0 for v in c.logprobs.token_logprobs)


def test_chat_logprobs_have_openais_shape(client, engine):
    messages = [{"role": "user", "content": "A stack class"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    (c,) = r.choices
    content = c.logprobs.content
    assert "".join(t.token for t in content) == c.message.content and len(content) == r.usage.completion_tokens
    ids = prompt_ids(engine.tokenizer, messages)
    assert abs(content[0].logprob - float(model_logprobs(engine, [*ids, 0])[-1].max())) < 1e-4
    for t in content:  # greedy: each token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.bytes == list(t.token.encode())
        assert abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 and t.logprob <= 0
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == c.message.content


def test_lm_eval_scores_a_task_through_the_server_as_in_process(server, tiny_run, tmp_path, monkeypatch):
    """lm-eval's `local-completions` model (echo + logprobs + max_tokens 1 on /v1/completions, token
    ids with the model's BOS) gets the in-process adapter's accuracy on a local multiple-choice task."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's API models need lm-eval[api]
    yaml = pytest.importorskip("yaml")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from kiln.eval.harness import KilnLM
    from kiln.post.export import export_hf

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"question": "def add(a, b):\n    ", "choices": ["return a + b", "def", "]]"], "answer": 0},
            {"question": "import", "choices": [" os", "(((", " return"], "answer": 0},
            {"question": "for i in range(10):\n    ", "choices": ["print(i)", "class", "import"], "answer": 0},
            {"question": "x = ", "choices": ["1", "def", ")"], "answer": 0}]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "kiln_served_mc.yaml").write_text(yaml.safe_dump({
        "task": "kiln_served_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    exported = export_hf(tiny_run, tmp_path / "hf")
    args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer={exported},tokenizer_backend=huggingface,"
            "add_bos_token=True,max_retries=1,num_concurrent=1")
    served = simple_evaluate(model="local-completions", model_args=args, tasks=["kiln_served_mc"], task_manager=tasks,
                             log_samples=True)
    local = simple_evaluate(model=KilnLM(str(tiny_run), device="cpu"), tasks=["kiln_served_mc"], task_manager=tasks,
                            log_samples=True)
    assert served["results"]["kiln_served_mc"]["acc,none"] == local["results"]["kiln_served_mc"]["acc,none"]
    for a, b in zip(served["samples"]["kiln_served_mc"], local["samples"]["kiln_served_mc"]):
        assert len(a["filtered_resps"]) == len(b["filtered_resps"]) == 3
        for x, y in zip(a["filtered_resps"], b["filtered_resps"]):  # each choice's (log-likelihood, is greedy)
            assert abs(float(x[0]) - float(y[0])) < 1e-3, (a["filtered_resps"], b["filtered_resps"])


# ---- bad input -------------------------------------------------------------------------------
BAD = [
    # (case, endpoint, body, status, param, fragment of the message)
    ("max_tokens 0", "completions", {"max_tokens": 0}, 400, "max_tokens", "must be at least 1"),
    ("max_tokens huge", "completions", {"max_tokens": 10**12}, 400, "max_tokens", "serve.max_new_tokens"),
    ("max_tokens negative", "chat", {"max_tokens": -5}, 400, "max_tokens", "must be at least 1"),
    ("n × max_tokens", "completions", {"n": 4, "max_tokens": 60}, 400, "max_tokens", "serve.max_total_tokens"),
    ("n over the limit", "completions", {"n": 5, "max_tokens": 4}, 400, "n", "serve.max_n"),
    ("prompt over the context", "completions", {"prompt": "x = 1\n" * 300}, 400, "prompt", "shorten it"),
    ("chat over the context", "chat", {"messages": [{"role": "user", "content": "y = 2\n" * 300}]}, 400,
     "messages", "shorten it"),
    ("wrong type", "completions", {"max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("temperature out of range", "completions", {"temperature": 9}, 400, "temperature", "less than or equal to 2"),
    ("unknown field", "completions", {"frobnicate": True}, 400, "frobnicate", "unknown field 'frobnicate'"),
    ("unsupported field", "completions", {"suffix": "x"}, 400, "suffix", "not supported"),
    ("echo without logprobs", "completions", {"echo": True}, 400, "echo", "with 'logprobs'"),
    ("max_tokens 0 without echo", "completions", {"max_tokens": 0, "logprobs": 1}, 400, "max_tokens", "at least 1"),
    ("logprobs while streaming", "completions", {"logprobs": 1, "stream": True}, 400, "logprobs", "stream"),
    ("top_logprobs alone", "chat", {"top_logprobs": 2}, 400, "top_logprobs", "needs 'logprobs'"),
    ("too many top_logprobs", "chat", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "20"),
    ("token ids out of range", "completions", {"prompt": [1, 99999]}, 400, "prompt", "ids in 0.."),
    ("too many stop strings", "completions", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("empty messages", "chat", {"messages": []}, 400, "messages", "at least 1"),
    ("unknown role", "chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "'system'"),
    ("empty content", "chat", {"messages": [{"role": "user", "content": " "}]}, 400, "messages", "empty"),
    ("unknown model", "completions", {"model": "../../etc/passwd"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize(("case", "endpoint", "body", "status", "param", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_an_openai_error(server, http, case, endpoint, body, status, param, fragment):
    base = {"model": "tiny", "max_tokens": 4}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat" else {"prompt": "x"}
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    r = http.post(server.url + path, json=base | body)
    err = r.json()["error"]
    assert r.status_code == status and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and fragment in err["message"], err


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="serve.max_new_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=100_000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(("body", "fragment"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"model": ' + b"[" * 100 + b"]" * 100 + b"}", "nests deeper than 32"),
    (b"[" * 20000 + b"]" * 20000, "not valid JSON"),
])
def test_malformed_json_gets_400(server, http, body, fragment):
    r = http.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def raw_request(url: str, head: str, body: bytes = b"") -> bytes:
    """Send a raw request (maybe only part of its body); return what the server answers before closing."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + body)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
    return got


def test_a_100_mb_body_is_refused_without_being_read(server):
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000\r\n\r\n")
    got = raw_request(server.url, head, b'{"model": "tiny", "prompt": "' + b"x" * 10000)
    assert got.startswith(b"HTTP/1.1 413") and b"serve.max_body_bytes" in got
    # the same without a declared length (chunked): refused once the limit is passed
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 40000
    got = raw_request(server.url, head, (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 2)
    assert got.startswith(b"HTTP/1.1 413")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_a_client_that_leaves_mid_stream_frees_its_row_at_once(server, engine):
    sched = server.state.scheduler
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    assert len(run_alone(engine, engine.encode_prompt(PROMPTS[3]), params).tokens) == 64  # a long generation
    cancelled = sched.finished.get("cancelled", 0)
    body = {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")
    assert wait_until(lambda: sched.finished.get("cancelled", 0) == cancelled + 1, 5)
    assert sched.running == 0 and server.state.active_requests == 0


# ---- limits and keys -------------------------------------------------------------------------
def open_stream(url: str, key: str | None = None, max_tokens: int = 64):
    """A streaming request left open after its first event."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    c = httpx.Client(timeout=30)
    r = c.send(c.build_request("POST", url + "/v1/completions", headers=headers, json={
        "model": "tiny", "prompt": PROMPTS[3], "max_tokens": max_tokens, "temperature": 0, "stream": True}),
        stream=True)
    assert r.status_code == 200
    next(r.iter_lines())
    return c, r


def test_a_full_queue_gets_429_and_the_server_carries_on(engine, http):
    with serve(engine, max_batch=1, max_queue=0) as srv:
        ask = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        refused = http.post(srv.url + "/v1/completions", json=ask | {"prompt": ["x", "y"]})  # 2 rows, 1 free
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert "queue is full" in refused.json()["error"]["message"]
        assert wait_until(lambda: srv.state.scheduler.running == 0, 5)
        assert http.post(srv.url + "/v1/completions", json=ask).status_code == 200


def test_an_api_key_guards_everything_but_health(engine, http):
    with serve(engine, api_key="sekret", max_streams_per_key=1) as srv:
        ask = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"}):
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
                r = http.request(method, srv.url + path, headers=headers, json=ask if method == "POST" else None)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
        assert http.get(srv.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(**ask).usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        # one request in flight per key (here one whose body is still on its way): the next gets 429
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            assert wait_until(lambda: srv.state.active_requests == 1, 5)
            with pytest.raises(openai.RateLimitError, match="serve.max_streams_per_key"):
                good.completions.create(**ask)
        assert wait_until(lambda: srv.state.active_requests == 0, 10)
        assert good.completions.create(**ask).usage.completion_tokens > 0


def test_listening_beyond_loopback_needs_a_key(monkeypatch):
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    with pytest.raises(KilnError, match="needs an API key; set serve.api_key or the KILN_API_KEY"):
        resolve_api_key(ServeConfig(host="0.0.0.0"))
    assert resolve_api_key(ServeConfig(host="127.0.0.1")) == ""
    assert resolve_api_key(ServeConfig(host="::1")) == ""
    assert resolve_api_key(ServeConfig(host="0.0.0.0", api_key="k")) == "k"
    monkeypatch.setenv("KILN_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig(host="0.0.0.0")) == "from-env"


def test_an_attack_loop_neither_crashes_the_server_nor_starves_a_normal_client(engine):
    """For ~3 s, against 127.0.0.1 only: 150 idle connections, 20 that trickle their headers, 10 that trickle
    a body, oversized and deeply nested bodies, and streams dropped right after they start. A normal
    request made meanwhile succeeds; idle and trickling connections are closed by the server."""
    with serve(engine, read_timeout_s=0.5, max_body_bytes=4096, max_batch=2) as srv:
        host, port = "127.0.0.1", srv.port
        stop = time.monotonic() + 3.0
        idle = [socket.create_connection((host, port)) for _ in range(150)]
        errors: list[str] = []

        def trickle_head() -> None:
            s = socket.create_connection((host, port))
            try:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\n")
                while time.monotonic() < stop:
                    s.sendall(b"X")
                    time.sleep(0.1)
            except OSError:
                return  # closed by the server: what should happen
            finally:
                s.close()
            errors.append("a connection trickling its headers stayed open for 3 s")

        def trickle_body() -> None:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            try:
                while time.monotonic() < stop:
                    s.sendall(b" ")
                    time.sleep(0.1)
                    s.settimeout(0.01)
                    with contextlib.suppress(TimeoutError):
                        if s.recv(4096).startswith(b"HTTP/1.1 408"):
                            return
                    s.settimeout(5)
            except OSError:
                return
            finally:
                s.close()
            errors.append("a trickled body was never refused")

        def junk() -> None:
            with httpx.Client(timeout=10) as c:
                while time.monotonic() < stop:
                    try:
                        big = c.post(srv.url + "/v1/completions", content=b"{" + b" " * 10_000 + b"}")
                        deep = c.post(srv.url + "/v1/completions", content=b"[" * 1000 + b"]" * 1000)
                    except httpx.TransportError:
                        continue  # the server closed a connection whose body it refused: fine
                    if (big.status_code, deep.status_code) != (413, 400):
                        errors.append(f"junk got {big.status_code}, {deep.status_code}")

        def dropped_streams() -> None:
            while time.monotonic() < stop:
                try:
                    c, r = open_stream(srv.url)
                    r.close()
                    c.close()
                except (httpx.HTTPError, AssertionError):
                    pass  # 429 when the queue is full is fine

        workers = [threading.Thread(target=f) for f in [trickle_head] * 20 + [trickle_body] * 10 + [junk] * 2
                   + [dropped_streams] * 2]
        for w in workers:
            w.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        normal = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "def ", "max_tokens": 8},
                            timeout=30)
        took = time.monotonic() - t0
        for w in workers:
            w.join(20)
        assert normal.status_code == 200 and normal.json()["usage"]["completion_tokens"] > 0
        assert took < 10, took
        assert not errors, errors[:3]
        for s in idle:  # the server closed every idle connection (read timeout 0.5 s)
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(1) == b""
            s.close()
        assert wait_until(lambda: srv.state.scheduler.running == 0 and srv.state.active_requests == 0, 10)
        assert httpx.get(srv.url + "/health").status_code == 200


# ---- the CLI ---------------------------------------------------------------------------------
def test_kiln_serve_stops_gracefully_finishing_the_stream_in_flight(tiny_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KILN_API_KEY", None)
    p = subprocess.Popen([sys.executable, "-m", "kiln", "serve", f"out={tiny_run}", "port=0", "max_batch=2",
                          "device=cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("kiln serve: model 'run' on http://127.0.0.1:"), line + p.stderr.read()
        url = line.split(" on ")[1].split("/v1")[0]
        body = {"model": "run", "prompt": PROMPTS[3], "max_tokens": 64, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            p.send_signal(signal.SIGTERM)  # mid-stream
            rest = [ln for ln in lines if ln]
        events = [json.loads(ln[6:]) for ln in [first, *rest] if ln.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        assert p.wait(timeout=30) == 0
        assert p.stdout.read().strip() == "kiln serve: stopped"
    finally:
        if p.poll() is None:
            p.kill()


# ---- the scheduler's thread ------------------------------------------------------------------
class _Ids:
    """The least of a tokenizer a batch over token ids needs: no end tokens, a vocabulary size."""

    def get_vocab_size(self) -> int:
        return 96

    def token_to_id(self, token: str):
        return None


def _tiny_engine() -> Engine:
    import torch

    from kiln.model.config import preset
    from kiln.model.transformer import Transformer

    model = Transformer(preset("tiny", vocab_size=96))
    model.init_weights(0)
    return Engine(model.eval(), _Ids(), torch.device("cpu"))


def test_the_decode_step_is_warmed_up_on_the_thread_that_steps_it(monkeypatch):
    """torch keeps CUDA graph trees per thread: graphs recorded while the server starts (in the
    thread that builds the scheduler) would be recorded again by the scheduler's thread at the first
    request. The warm-up runs on the scheduler's thread, before the scheduler is ready."""
    from kiln.infer import decode

    warmed, stepped = [], []

    def warm_up(self, cache):
        warmed.append(threading.get_ident())

    def step(self, tokens, cache, rows, used):
        stepped.append(threading.get_ident())
        return self._step(tokens[:rows], cache.lengths[:rows], cache.k, cache.v, used)  # eagerly: no compile here

    monkeypatch.setattr(decode.DecodeStep, "warm_up", warm_up)
    monkeypatch.setattr(decode.DecodeStep, "__call__", step)
    with Scheduler(_tiny_engine(), max_batch=2, max_queue=4, compile=True) as sched:
        assert len(warmed) == 1  # done before the scheduler takes requests
        seq = Sequence([1, 5, 9], SamplingParams(max_new_tokens=4, temperature=0.0), None)
        sched.submit([seq])
        assert sched.wait([seq], 60) and len(seq.tokens) == 4
    assert stepped and set(stepped) == set(warmed) == {sched._thread.ident}
    assert threading.get_ident() not in warmed


def test_a_warm_up_that_fails_stops_the_scheduler_from_starting(monkeypatch):
    from kiln.infer import decode

    def broken(self, cache):
        raise RuntimeError("out of memory while recording")

    monkeypatch.setattr(decode.DecodeStep, "warm_up", broken)
    with pytest.raises(RuntimeError, match="out of memory while recording"):
        Scheduler(_tiny_engine(), max_batch=2, max_queue=4, compile=True)


def test_cuda_graphs_are_warmed_up_once_per_thread_other_compiled_steps_once():
    """The step remembers which threads warmed it up when it replays CUDA graphs (their trees are
    per thread); otherwise one warm-up serves every thread (dynamo's code is shared)."""
    import torch

    from kiln.infer import decode
    from kiln.model.transformer import KVCache

    def warm_ups(settings: decode.StepCompile) -> int:
        model = _tiny_engine().model
        step = decode.DecodeStep(model, compile=True, settings=settings)
        calls = []
        step._compiled = lambda tokens, cache, rows, used: calls.append(threading.get_ident()) or torch.zeros(rows, 96)
        cache = KVCache(model.cfg, 2, 128)
        step.warm_up(cache)
        step.warm_up(cache)  # again on this thread: nothing to do
        worker = threading.Thread(target=step.warm_up, args=(cache,))
        worker.start()
        worker.join()
        return len(set(calls))

    assert warm_ups(decode.StepCompile({"backend": "eager"}, cuda_graphs=True)) == 2
    assert warm_ups(decode.StepCompile({"backend": "eager"})) == 1


def test_the_generation_thread_decodes_under_the_creating_threads_torch_state():
    """torch's grad mode and thread count are per OS thread (a new thread starts with grad on): the
    scheduler's thread takes the thread count of the thread that made the scheduler, and runs with
    grad off (`ThreadState`)."""
    import torch

    engine = _tiny_engine()
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    seen: dict = {}

    class Probe(Scheduler):
        def _loop(self) -> None:  # runs on the generation thread, outside any `Batch` step
            seen.update(thread=threading.current_thread().name, grad=torch.is_grad_enabled(),
                        threads=torch.get_num_threads())
            super()._loop()

    torch.set_num_threads(wanted)
    try:
        with Probe(engine, max_batch=1, max_queue=1) as sched:
            seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0.0), engine.tokenizer)
            sched.submit([seq])  # the loop has started once this one has ended (however: `_Ids` has no text)
            assert sched.wait([seq], 30)
    finally:
        torch.set_num_threads(before)
    assert torch.is_grad_enabled()  # the test's own thread is untouched
    assert seen == {"thread": "kiln-engine", "grad": False, "threads": wanted}


def test_kiln_serve_loads_steps_and_scores_its_model_on_one_thread(tiny_run, http):
    """libgomp spins its idle workers between ops only while the process's OpenMP threads (one pool
    per OS thread that ever ran a parallel op) fit the CPUs; a model loaded on one thread and
    stepped on another, or a scoring forward on an HTTP worker, is a second pool that makes every
    op of a small model's decode pay a wake-up. The server (as `kiln serve` starts it) loads the
    model, decodes, and scores `logprobs` / `echo` on its engine thread, and nowhere else."""
    threads: dict[str, set[int]] = {"load": set(), "forward": set()}

    def load() -> Engine:
        threads["load"].add(threading.get_ident())
        eng = Engine.from_run(tiny_run, "cpu")
        eng.model.register_forward_pre_hook(lambda *_: threads["forward"].add(threading.get_ident()))
        return eng

    with serve(load) as srv:  # type: ignore[arg-type]
        engine_thread = srv.state.scheduler._thread.ident
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        streamed = http.post(srv.url + "/v1/completions", json={**body, "stream": True})
        scored = http.post(srv.url + "/v1/completions", json={**body, "max_tokens": 1, "echo": True, "logprobs": 2})
        chat = http.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "logprobs": True,
                                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert streamed.status_code == scored.status_code == chat.status_code == 200
    assert scored.json()["choices"][0]["logprobs"]["token_logprobs"][1] < 0
    assert threads["load"] == {engine_thread} and threads["forward"] == {engine_thread}
    assert threading.get_ident() != engine_thread


def test_a_model_that_fails_to_load_stops_the_server_from_starting_with_its_error():
    def load() -> Engine:
        raise KilnError("checkpoint.pt is not a kiln checkpoint (truncated?); retrain or point out= at another run")

    srv = serve(load)  # type: ignore[arg-type]
    with pytest.raises(KilnError, match="not a kiln checkpoint"):
        srv.state.start()
    srv.sock.close()


def test_call_runs_on_the_engine_thread_between_steps_and_hands_back_errors():
    """`Scheduler.call(fn)`: what a request needs from the model besides generation runs on the
    engine's thread, never while a step is half done; its result or exception comes back."""
    engine = _tiny_engine()
    with Scheduler(engine, max_batch=2, max_queue=4) as sched:
        seq = Sequence([1, 5, 9], SamplingParams(max_new_tokens=40, temperature=0.0), None)
        sched.submit([seq])
        sizes = [sched.call(lambda: (threading.get_ident(), len(seq.tokens))).result(30) for _ in range(5)]
        assert {t for t, _ in sizes} == {sched._thread.ident}
        with pytest.raises(ZeroDivisionError):
            sched.call(lambda: 1 / 0).result(30)
        assert sched.wait([seq], 60) and len(seq.tokens) == 40  # the calls did not disturb the decode
    with pytest.raises(QueueFull):
        sched.call(lambda: None)


def test_serve_draft_decodes_speculatively_with_the_same_greedy_text(tiny_run, engine, http):
    """`serve.draft=RUN`: the draft (here the run itself, so every drafted token is kept) proposes
    tokens the model checks in one forward; the answer is plain decoding's, /metrics counts drafts."""
    def load() -> Engine:
        eng = Engine.from_run(tiny_run, "cpu")
        eng.add_draft(tiny_run, 3)
        return eng

    want = greedy(engine, PROMPTS[0], 24)
    with serve(load) as srv:  # type: ignore[arg-type]
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}
        got = http.post(srv.url + "/v1/completions", json=body).json()["choices"][0]["text"]
        streamed = http.post(srv.url + "/v1/completions", json={**body, "stream": True}).text
        metrics = http.get(srv.url + "/metrics").text
    assert got == want
    pieces = [json.loads(ln[6:])["choices"][0]["text"] for ln in streamed.splitlines() if ln.startswith("data: {")]
    assert "".join(pieces) == want
    counts = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines() if ln.startswith("kiln_draft")}
    assert counts["kiln_draft_tokens_proposed_total"] > 0
    assert counts["kiln_draft_tokens_accepted_total"] / counts["kiln_draft_tokens_proposed_total"] > 0.9


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(tiny_run):
    """A draft's token ids must mean what the model's mean: a tokenizer that differs in one entry is refused."""
    eng = Engine.from_run(tiny_run, "cpu")
    real = eng.tokenizer

    class Swapped:  # the same tokenizer with two ids swapped
        def __getattr__(self, name):
            return getattr(real, name)

        def get_vocab(self):
            vocab = dict(real.get_vocab())
            a, b = sorted(vocab)[300:302]
            vocab[a], vocab[b] = vocab[b], vocab[a]
            return vocab

    eng.tokenizer = Swapped()
    with pytest.raises(KilnError, match=r"serve.draft=.*tokenizer differs from the served model's"):
        eng.add_draft(tiny_run)
    assert eng.draft is None


@pytest.mark.parametrize("interval", [0.0, 1000.0])
def test_stream_interval_batches_writes_not_events(engine, interval):
    """`serve.stream_interval_ms`: the tokens made within an interval go out in one write, each
    still its own event; the first token goes out at once and the end is never held back."""
    with serve(engine, stream_interval_ms=interval) as srv, httpx.Client(timeout=60) as c:
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0, "stream": True}
        whole = c.post(srv.url + "/v1/completions", json={**body, "stream": False}).json()["choices"][0]
        writes, text = [], ""
        started = time.perf_counter()
        with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
            for raw in r.iter_raw():
                writes.append((time.perf_counter() - started, raw))
        events = [json.loads(ln[6:]) for ln in b"".join(w for _, w in writes).decode().splitlines()
                  if ln.startswith("data: {")]
        text = "".join(e["choices"][0]["text"] for e in events)
    assert text == whole["text"] and events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert len(events) >= 10  # a token (or a few characters) an event, whatever the interval
    if interval:
        assert len(writes) <= 4  # the first token; everything up to the end in one; [DONE]
        assert b'"text":' in writes[0][1] and writes[0][0] < 0.9  # the first token was not held back
