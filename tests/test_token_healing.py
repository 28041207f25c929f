"""Token healing: a text prompt ending in a bare "\\n" (a token the BPE merged with the next line's
indentation in training) is backed off one token and the first new token extends it; the text
returned is still what follows the prompt. Token-id prompts are taken as sent, and `heal=false`
gives the old output exactly."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from conftest import kiln
from kiln.config import SampleConfig, ServeConfig
from kiln.infer import healing
from kiln.infer.engine import SamplingParams
from kiln.infer.generate import Engine, generate

PROMPT = 'def f(x):\n    """Return x."""\n'  # ends in a lone "\n": the BPE wrote "\n   " after a docstring


@pytest.fixture(scope="module")
def engine(tiny_run) -> Engine:
    return Engine.from_run(tiny_run, "cpu")


def tid(engine: Engine, text: str) -> int:
    """The id of the token whose text is `text`."""
    (i,) = [i for i in range(engine.tokenizer.get_vocab_size()) if engine.tokenizer.decode([i]) == text]
    return i


def biased(engine: Engine, monkeypatch, bias: dict[int, float]) -> None:
    """Add `bias` to the prefill's logits (the first new token's), so the unconstrained choice is known."""
    add = torch.zeros(engine.model.cfg.vocab_size)
    for i, v in bias.items():
        add[i] = v
    plain = type(engine.model).logits.__get__(engine.model)
    monkeypatch.setattr(engine.model, "logits", lambda hidden: plain(hidden) + add.to(hidden.device))


def test_a_prompt_ending_in_a_newline_backs_off_that_token(engine):
    ids = engine.encode_prompt(PROMPT)
    assert engine.tokenizer.decode([ids[-1]]) == "\n"
    plan = healing.plan(engine.tokenizer, ids)
    texts = [engine.tokenizer.decode([i]) for i in plan.allowed]
    assert plan.backoff == 1 and plan.text == "\n" and ids[-1] in plan.allowed
    assert all(t.startswith("\n") for t in texts) and "\n   " in texts
    ends = engine.tokenizer.decode_batch([[i] for i in range(engine.tokenizer.get_vocab_size())])
    assert set(plan.allowed) == {i for i, t in enumerate(ends) if t.startswith("\n")}
    # nothing to heal: a single token, a special token, a token no longer one extends
    assert healing.plan(engine.tokenizer, ids[:1]) is None
    assert healing.plan(engine.tokenizer, [*ids, engine.chat_format.eos[0]]) is None
    whole = next(i for i, t in enumerate(ends) if t.isidentifier() and not any(
        u != t and u.startswith(t) for u in ends))
    assert healing.plan(engine.tokenizer, [*ids[:-1], whole]) is None


def test_the_first_token_is_the_best_one_extending_the_backed_off_text(engine, monkeypatch):
    """Forced logits: unconstrained, greedy would write `def` straight after the "\\n"; healed,
    it writes the best token that extends "\\n" ("\\n       " here), streamed without the "\\n"."""
    ret, deep = tid(engine, "def"), tid(engine, "\n       ")
    biased(engine, monkeypatch, {ret: 100.0, deep: 50.0})
    ids = engine.encode_prompt(PROMPT)
    plain = generate(engine.model, [ids], SamplingParams(6, temperature=0.0), tokenizer=engine.tokenizer,
                     stop_ids=engine.stop_ids)[0]
    assert plain.tokens[0] == ret and plain.text.startswith("def") and plain.fed == ids
    (seq,) = generate(engine.model, [ids], SamplingParams(6, temperature=0.0, heal=True), tokenizer=engine.tokenizer,
                      stop_ids=engine.stop_ids)
    assert seq.prompt == ids and seq.fed == ids[:-1] and seq.heal_text == "\n"
    assert seq.tokens[0] == deep and seq.text.startswith("       ") and not seq.text.startswith("\n")
    assert engine.tokenizer.decode(seq.fed + seq.tokens) == engine.tokenizer.decode(ids) + seq.text
    # the best allowed token of the model's own logits at the prompt less its "\n"
    with torch.no_grad():
        logits = engine.model.logits(engine.model(torch.tensor([ids[:-1]]), return_hidden=True)[0, -1])
    allowed = list(healing.plan(engine.tokenizer, ids).allowed)
    assert seq.tokens[0] == allowed[int(logits[allowed].argmax())]
    # rows of one batch heal or not, each as asked
    both = generate(engine.model, [ids, ids], [SamplingParams(6, temperature=0.0, heal=h) for h in (True, False)],
                    tokenizer=engine.tokenizer, stop_ids=engine.stop_ids)
    assert [s.tokens for s in both] == [seq.tokens, plain.tokens] and [s.text for s in both] == [seq.text, plain.text]


def test_healing_unforced_picks_the_best_extension_and_streams_only_what_follows(engine):
    ids = engine.encode_prompt(PROMPT)
    sc = SampleConfig(prompt=PROMPT, max_new_tokens=12, temperature=0.0)  # sample.heal: on by default
    pieces: list[str] = []
    (text,) = engine.generate(PROMPT, sc, on_token=lambda i, s: pieces.append(s))
    (seq,) = generate(engine.model, [ids], SamplingParams(12, temperature=0.0, heal=True), tokenizer=engine.tokenizer,
                      stop_ids=engine.stop_ids)
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids[:-1]]))[0, -1]
    allowed = list(healing.plan(engine.tokenizer, ids).allowed)
    assert seq.tokens[0] == allowed[int(logits[allowed].argmax())]
    assert "".join(pieces) == text == seq.text
    assert engine.tokenizer.decode(seq.fed + seq.tokens) == engine.tokenizer.decode(ids) + text
    assert text == engine.tokenizer.decode(seq.tokens)[1:]  # the first token's "\n" is the prompt's


def test_sampled_first_tokens_only_ever_extend_the_backed_off_text(engine, monkeypatch):
    ret = tid(engine, "def")
    biased(engine, monkeypatch, {ret: 100.0})
    ids = engine.encode_prompt(PROMPT)
    allowed = set(healing.plan(engine.tokenizer, ids).allowed)
    params = [SamplingParams(4, temperature=1.5, top_k=0, top_p=1.0, seed=f"s/{i}", heal=True) for i in range(24)]
    seqs = generate(engine.model, [ids] * 24, params, tokenizer=engine.tokenizer, stop_ids=engine.stop_ids)
    assert all(s.tokens[0] in allowed for s in seqs) and len({s.tokens[0] for s in seqs}) > 1
    whole = engine.tokenizer.decode(ids)
    assert all(engine.tokenizer.decode(s.fed + s.tokens) == whole + s.text for s in seqs)
    # top-k 1 keeps the best allowed token only: never the forced one, which does not extend "\n"
    one = generate(engine.model, [ids], SamplingParams(4, temperature=1.0, top_k=1, seed="x", heal=True),
                   tokenizer=engine.tokenizer, stop_ids=engine.stop_ids)[0]
    assert one.tokens[0] in allowed and one.tokens[0] != ret


def test_grpo_text_rollouts_are_healed_and_train_on_what_the_policy_read(engine, monkeypatch):
    """`kiln rl` in text format (`rl.heal`): the policy reads the prompt less its "\\n" and its
    first token extends it; the batch trains on the prompt as read plus the completion, and the
    reward sees only what follows the prompt. Chat rollouts (and `rl.heal=false`) read it as sent."""
    from kiln.workloads.rl import RolloutLoader, complete, sequences_batch

    ret, deep = tid(engine, "def"), tid(engine, "\n       ")
    biased(engine, monkeypatch, {ret: 100.0, deep: 50.0})
    ids = engine.encode_prompt(PROMPT)
    vocab = engine.tokenizer.get_vocab_size()
    healed, plain = (complete(engine.model, [ids], 1, 0.0, 0, 1.0, "t", set(), vocab, None, engine.tokenizer, h)[0]
                     for h in (True, False))
    assert (healed.prompt, healed.ids, healed.healed) == (ids[:-1], [deep], "\n")
    assert (plain.prompt, plain.ids, plain.healed) == (ids, [ret], "")
    rc = SimpleNamespace(max_new_tokens=1, heal=True)
    for fmt, want in (("text", "       "), ("chat", None)):
        loader = SimpleNamespace(tok=engine.tokenizer, stop_ids=set(), fmt=fmt, rc=rc, _stop_text=lambda: None)
        loader.complete = RolloutLoader.complete.__get__(loader)
        (got,) = loader.complete(engine.model, [SimpleNamespace(ids=ids)], 0.0, 0, 1.0, "t")
        assert got == (healed if fmt == "text" else plain)
        if want is not None:  # the reward's text: after the prompt, which already has the "\n"
            assert RolloutLoader.completion_text(loader, got) == want
    batch = sequences_batch([healed.prompt], [healed.ids], pad=0)
    assert batch["input_ids"][0].tolist() == ids[:-1] + [deep]
    assert batch["labels"][0].tolist() == [-100] * (len(ids) - 2) + [deep, -100]


def test_token_id_prompts_are_not_healed(engine):
    ids = engine.encode_prompt(PROMPT)
    # generate() without heal (what evaluation, lm-eval, RL and distillation call): the prompt as sent
    (seq,) = generate(engine.model, [ids], SamplingParams(6, temperature=0.0), tokenizer=engine.tokenizer,
                      stop_ids=engine.stop_ids)
    assert seq.healing is None and seq.fed == ids and seq.heal_text == ""
    (ids_only,) = generate(engine.model, [ids], SamplingParams(6, temperature=0.0, heal=True), stop_ids=set())
    assert ids_only.healing is None  # no tokenizer: ids only, nothing healed
    # the server: text prompts of completions are healed, token ids, chat and scored prompts are not
    from kiln.serve.api import ChatRequest, CompletionRequest, _params

    state = SimpleNamespace(sv=ServeConfig(), max_prompt=100, context=128)
    req = CompletionRequest.model_validate({"model": "m", "prompt": [PROMPT, "x = 1\n"], "max_tokens": 4, "n": 2})
    assert [p.heal for p in _params(state, req, False, [ids, ids])] == [True] * 4
    for sent in (ids, [ids, ids]):
        req = CompletionRequest.model_validate({"model": "m", "prompt": sent, "max_tokens": 4, "n": 2})
        assert not any(p.heal for p in _params(state, req, False, [ids] * (len(sent) if sent is not ids else 1)))
    req = CompletionRequest.model_validate({"model": "m", "prompt": PROMPT, "max_tokens": 4, "logprobs": 1})
    assert [p.heal for p in _params(state, req, False, [ids])] == [False]
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert [p.heal for p in _params(state, chat, True, [ids])] == [False]
    state.sv = ServeConfig(heal=False)
    req = CompletionRequest.model_validate({"model": "m", "prompt": PROMPT, "max_tokens": 4})
    assert [p.heal for p in _params(state, req, False, [ids])] == [False]


def test_heal_off_gives_the_unhealed_output_exactly(tiny_run, engine, monkeypatch, capsys):
    """sample.heal=false: the prompt as encoded, prefilled whole, the first token unconstrained."""
    ids = engine.encode_prompt(PROMPT)
    want = []
    with torch.no_grad():  # greedy by recomputing everything: no cache, no healing
        cur = list(ids)
        for _ in range(8):
            nxt = int(engine.model(torch.tensor([cur]))[0, -1, : engine.tokenizer.get_vocab_size()].argmax())
            if nxt in engine.stop_ids:
                break
            cur.append(nxt)
            want.append(nxt)
    sc = SampleConfig(prompt=PROMPT, max_new_tokens=8, temperature=0.0, heal=False)
    (off,) = engine.generate(PROMPT, sc)
    (on,) = engine.generate(PROMPT, dataclasses.replace(sc, heal=True))
    assert off == engine.tokenizer.decode(want)
    # the switch on the command line: `kiln generate heal=false` prints the unhealed completion
    assert kiln("generate", f"out={tiny_run}", f"prompt={PROMPT}", "max_new_tokens=8", "temperature=0",
                "heal=false") == 0
    assert capsys.readouterr().out == PROMPT + off + "\n"
    assert kiln("generate", f"out={tiny_run}", f"prompt={PROMPT}", "max_new_tokens=8", "temperature=0") == 0
    assert capsys.readouterr().out == PROMPT + on + "\n"  # on by default
    ret = tid(engine, "def")
    biased(engine, monkeypatch, {ret: 100.0})  # unconstrained, "def" comes first; healed, never
    (off,) = engine.generate(PROMPT, sc)
    (on,) = engine.generate(PROMPT, dataclasses.replace(sc, heal=True))
    assert off.startswith("def") and not on.startswith("def")
