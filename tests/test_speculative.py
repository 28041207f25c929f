"""Speculative decoding (`kiln.infer.speculative`): a draft model proposes tokens, the model checks
them in one forward. Greedy output is the model's own token for token; sampled output follows the
model's distribution exactly (checked against probabilities computed from the model itself); the
server serves with `serve.draft`."""

from __future__ import annotations

import itertools

import pytest
import torch

from kiln.infer import speculative
from kiln.infer.engine import Batch, SamplingParams, Sequence, sampling_probs
from kiln.model.config import preset
from kiln.model.transformer import Transformer


def _model(seed: int, vocab: int = 96, sharpen: float = 0.0, **overrides) -> Transformer:
    m = Transformer(preset("tiny", vocab_size=vocab, **overrides))
    m.init_weights(seed)
    if sharpen:  # an untied head of its own: next-token distributions that differ clearly between models
        g = torch.Generator().manual_seed(1000 + seed)
        m.lm_head.weight = torch.nn.Parameter(torch.randn(m.lm_head.weight.shape, generator=g) * sharpen)
    return m.eval()


def _run(model, prompts, params, draft=None, k=3, rows=3, vocab=96) -> tuple[list[Sequence], Batch]:
    """`prompts` to completion on one batch of `rows` rows, new prompts joining as rows free."""
    batch = Batch(model, vocab, set(), rows, model.cfg.max_seq_len)
    if draft is not None:
        speculative.attach(batch, draft, k, adapt=False)  # every allowed round: exactness does not depend on pace
    seqs = [Sequence(p, sp, None) for p, sp in zip(prompts, params)]
    waiting = list(seqs)
    while waiting or batch.running:
        if waiting and batch.free_rows():
            take, waiting = waiting[: batch.free_rows()], waiting[batch.free_rows():]
            batch.add(take)
        batch.step()
    return seqs, batch


PROMPTS = [[1, 5, 9, 2], [7] * 11, [3, 4], list(range(20, 50)), [8, 8, 9]]


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_is_the_models_own_token_for_token(k):
    """With a draft that agrees often (the model itself) and one that rarely does (another model),
    rows of different lengths joining and leaving a 3-row batch: the tokens are plain decoding's."""
    model = _model(0)
    params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (24, 9, 30, 17, 12)]
    plain, _ = _run(model, PROMPTS, params)
    for draft, agrees in ((_model(0), True), (_model(1), False)):
        spec, batch = _run(model, PROMPTS, params, draft=draft, k=k)
        assert [s.tokens for s in spec] == [s.tokens for s in plain]
        assert batch.drafter.rounds > 0
        if agrees:
            assert batch.drafter.acceptance > 0.95  # the model drafting for itself: every token kept
            assert batch.drafter.rounds < sum(len(s.tokens) for s in plain) / 2 * (1 if k == 1 else 0.5)


def test_a_round_is_only_taken_where_every_row_has_room_and_no_penalty():
    model = _model(0)
    prompt = [1 + i % 90 for i in range(125)]  # 3 positions short of the 128-token context: no room for k + 1 = 4
    spec, batch = _run(model, [prompt], [SamplingParams(max_new_tokens=3, temperature=0.0)], draft=_model(0), k=3)
    plain, _ = _run(model, [prompt], [SamplingParams(max_new_tokens=3, temperature=0.0)])
    assert spec[0].tokens == plain[0].tokens and batch.drafter.rounds == 0
    pen = [SamplingParams(max_new_tokens=8, temperature=0.0, repetition_penalty=1.3)]
    spec, batch = _run(model, [[1, 2, 3]], pen, draft=_model(0))
    assert spec[0].tokens == _run(model, [[1, 2, 3]], pen)[0][0].tokens and batch.drafter.rounds == 0


def _exact(model: Transformer, prompt: list[int], n: int, sp: SamplingParams, vocab: int) -> torch.Tensor:
    """The model's exact probability of every sequence of `n` tokens after `prompt`, sampled with `sp`
    (temperature, top-k, top-p): a (vocab,) * n tensor, from the model's own logits."""
    def dist(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prefix]))[0, -1:, :vocab]
        return sampling_probs(logits, sp.temperature, sp.top_k, sp.top_p)[0]

    out = torch.zeros((vocab,) * n)
    for seq in itertools.product(range(vocab), repeat=n - 1):
        p = 1.0
        for i, t in enumerate(seq):
            p = p * dist(prompt + list(seq[:i]))[t]
        if p > 1e-9:
            out[seq] = p * dist(prompt + list(seq))
    return out


def test_the_acceptance_rule_keeps_the_models_distribution_exactly():
    """`accept` on 400,000 rows of one round (k = 2, a vocabulary of 5, distributions that overlap):
    the first token a row emits follows p at the first position, and the second, given the first
    draft was kept, follows p at the second; the draft's q would not pass (nor would a refusal
    drawn from p instead of max(0, p - q))."""
    g = torch.Generator().manual_seed(0)
    rows, k, v = 400_000, 2, 5
    p = torch.softmax(torch.randn(k + 1, v, generator=g), -1)
    q = torch.softmax(torch.randn(k, v, generator=g), -1)
    drafted = torch.stack([torch.multinomial(q[i], rows, replacement=True, generator=g) for i in range(k)], 1)
    kept, token = speculative.accept(p.expand(rows, -1, -1), q.expand(rows, -1, -1), drafted,
                                     torch.rand(rows, k + 1, generator=g))
    first = torch.where(kept > 0, drafted[:, 0], token)
    second = torch.where(kept > 1, drafted[:, 1], token)[kept > 0]

    def tv(tokens, dist):
        return (torch.bincount(tokens, minlength=v) / len(tokens) - dist).abs().sum().item() / 2

    assert tv(first, p[0]) < 0.005 and tv(second, p[1]) < 0.005  # sampling noise here: ~0.001-0.002
    assert (q[0] - p[0]).abs().sum() / 2 > 0.1 and (q[1] - p[1]).abs().sum() / 2 > 0.1
    assert 0.2 < (kept > 0).float().mean() < 0.9  # both outcomes are exercised


@pytest.mark.parametrize("k,settings", [(2, dict(temperature=1.0)), (1, dict(temperature=1.3, top_k=5, top_p=0.95))])
def test_sampled_output_follows_the_models_distribution(monkeypatch, k, settings):
    """End to end through the batch (drafting, one verifying forward, the caches rolled back):
    3,000 seeded samples of 3 tokens from a vocabulary of 8, drafted by a model whose distribution
    overlaps the model's but differs from it, match the model's exact probabilities of the
    3-token sequences (computed from its logits, not by sampling), as plain sampling does."""
    monkeypatch.setattr(speculative, "MAX_ROWS", 64)
    vocab, n, samples = 8, 3, 3000
    model, draft = _model(0, vocab, sharpen=0.3), _model(0, vocab, sharpen=0.3)
    with torch.no_grad():  # the same model with a perturbed head: often agrees, often not
        draft.lm_head.weight.add_(torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    prompt = [1, 2, 3, 4]

    def distribution(seqs) -> torch.Tensor:
        counts = torch.zeros((vocab,) * n)
        for s in seqs:
            counts[tuple(s.tokens)] += 1
        return counts / len(seqs)

    params = [SamplingParams(max_new_tokens=n, seed=i, **settings) for i in range(samples)]
    seqs, batch = _run(model, [prompt] * samples, params, draft=draft, k=k, rows=64, vocab=vocab)
    assert batch.drafter.rounds > 0 and 0.2 < batch.drafter.acceptance < 0.9  # both outcomes happen often
    spec = distribution(seqs)
    plain = distribution(_run(model, [prompt] * samples, params, rows=64, vocab=vocab)[0])
    target, drafts = _exact(model, prompt, n, params[0], vocab), _exact(draft, prompt, n, params[0], vocab)

    def tv(a, b, dims=()) -> float:
        return (a.sum(dims) - b.sum(dims)).abs().sum().item() / 2 if dims else (a - b).abs().sum().item() / 2

    assert tv(drafts, target) > 0.3  # a rule that kept the draft's tokens would fail below
    for dims in ((), (0, 2), (0, 1)):  # the 3-token sequences; the second token; the third
        assert tv(spec, target, dims) < tv(plain, target, dims) + 0.015, dims


def _pace_run(pace: speculative.Pace, steps: int, round_tokens: int, round_s: float, plain_s: float) -> str:
    """`steps` decisions for one row, rounds handing out `round_tokens` in `round_s`, plain steps
    taking `plain_s`: 'R' for a round, 'P' for a plain step."""
    out = []
    for _ in range(steps):
        if pace.speculate(1):
            pace.round(1, round_tokens, round_s)
            out.append("R")
        else:
            pace.plain(1, plain_s)
            out.append("P")
    return "".join(out)


def test_pace_keeps_rounds_that_pay_and_backs_off_from_rounds_that_lose():
    """Rounds yielding 3 tokens in 2 ms beat plain steps of 1 ms: taken, but for 2 plain steps every
    64 rounds that keep the plain figure current. Rounds yielding 1.5 tokens in 2 ms lose: after a
    trial of 4 rounds the batch steps plainly for 8 steps, then 16, 32, ... (each time after a trial
    round that loses again), up to 256."""
    wins = _pace_run(speculative.Pace(), 200, 3, 0.002, 0.001)
    assert wins == ("PP" + "R" * 64) * 3 + "PP"
    loses = _pace_run(speculative.Pace(), 400, 3, 0.004, 0.001)
    assert loses.startswith("PP" + "RRRR" + "P" * 8 + "RRRR" + "P" * 16 + "RRRR" + "P" * 32 + "RRRR" + "P" * 64)
    assert loses.count("R") < 30


def test_pace_turns_rounds_off_for_a_draft_that_never_agrees():
    """End to end on a batch with `adapt` on: a draft of other weights (its tokens almost never kept)
    makes rounds slower than plain steps, so after each trial the batch steps plainly, longer each
    time; greedy output stays the model's either way."""
    model = _model(0, sharpen=1.0)
    params = [SamplingParams(max_new_tokens=100, temperature=0.0)]
    plain, _ = _run(model, [[1, 5, 9, 2]], params)
    batch = Batch(model, 96, set(), 1, model.cfg.max_seq_len)
    speculative.attach(batch, _model(1, sharpen=1.0), 3)
    seq = Sequence([1, 5, 9, 2], params[0], None)
    batch.add([seq])
    while batch.running:
        batch.step()
    assert seq.tokens == plain[0].tokens
    # every round hands out 1 token: 100 rounds if each were taken; quiet, 16 (4 trials of 4 rounds)
    assert batch.drafter.acceptance < 0.2 and 0 < batch.drafter.rounds <= 50
