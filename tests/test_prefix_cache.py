"""Shared prompt prefixes (`kiln.infer.prefix`): prompts of one `Batch.add` that begin alike prefill
their prefix once, and a plain inference batch (the server's) keeps recent prefixes' keys and values
across calls. Every result is checked against the same batch with sharing off: the same first-step
logits (to float32 rounding) and the same greedy tokens, with the counters showing what was reused."""

from __future__ import annotations

import random

import pytest
import torch

from kiln.infer.engine import Batch, SamplingParams, Sequence
from kiln.infer.generate import Engine, generate
from kiln.infer.prefix import BLOCK, PrefixCache, shared_groups
from kiln.model.config import preset
from kiln.model.transformer import Transformer
from kiln.serve.scheduler import Scheduler

VOCAB = 96


class _Ids:
    """The least of a tokenizer a batch over token ids needs: no end tokens, a vocabulary size."""

    def get_vocab_size(self) -> int:
        return VOCAB

    def token_to_id(self, token: str):
        return None


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=VOCAB, **overrides))
    model.init_weights(0)
    with torch.no_grad():  # sharper than at initialization, so a wrong key or value changes the greedy tokens
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def _greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def _run(batch: Batch, prompts: list[list[int]], new_tokens: int = 8):
    """Add `prompts` in one call and decode them to the end: (tokens, first-step logits, sequences)."""
    seen: dict[int, torch.Tensor] = {}
    sample = batch._sample

    def capture(logits, a, b, *args, **kwargs):
        for i in range(logits.shape[0]):
            seen.setdefault(a + i, logits[i].float().clone())
        return sample(logits, a, b, *args, **kwargs)

    batch._sample = capture
    seqs = [Sequence(p, _greedy(new_tokens), None) for p in prompts]
    free = [i for i, s in enumerate(batch.seqs) if s is None][: len(seqs)]
    batch.add(seqs)
    batch._sample = sample
    while batch.running:
        batch.step()
    return [s.tokens for s in seqs], torch.stack([seen[r] for r in free]), seqs


def _compare(prompts: list[list[int]], rows: int | None = None, max_len: int = 128, **overrides):
    """The same prompts through a batch with sharing off and one with it on."""
    model = _model(**overrides)
    off = Batch(model, VOCAB, set(), rows or len(prompts), max_len, share_prefix=False)
    on = Batch(model, VOCAB, set(), rows or len(prompts), max_len)
    tokens_off, logits_off, _ = _run(off, prompts)
    tokens_on, logits_on, _ = _run(on, prompts)
    assert tokens_on == tokens_off
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-5, atol=1e-5)
    total = sum(len(p) for p in prompts)
    assert (off.prompt_tokens_prefilled, off.prompt_tokens_reused) == (total, 0)
    assert on.prompt_tokens_prefilled + on.prompt_tokens_reused == total
    return on


# ---- within one add ----------------------------------------------------------------------------
WINDOWED = {"sliding_window": 16}  # Mistral's attention: a shared prefix longer than the window


@pytest.mark.parametrize("overrides", [{}, WINDOWED], ids=["full", "windowed"])
def test_8_copies_of_one_prompt_prefill_it_once(overrides):
    """GRPO's group, `kiln generate`'s samples: the prompt less its last token is prefilled once and
    copied into the 8 rows; each row prefills its last token (for its own first-token logits)."""
    prompt = _ids(50, 1)
    on = _compare([prompt] * 8, **overrides)
    assert on.prompt_tokens_reused == 7 * 49
    assert on.prompt_tokens_prefilled == 49 + 8


@pytest.mark.parametrize("overrides", [{}, WINDOWED], ids=["full", "windowed"])
def test_prompts_sharing_a_prefix_mixed_with_others_of_other_lengths(overrides):
    system = _ids(40, 2)
    prompts = [system + _ids(k, 10 + k) for k in (1, 3, 7, 12)]  # share 40 tokens, then differ
    prompts += [_ids(9, 3), _ids(33, 4), system[:20] + _ids(5, 5)]  # unrelated; one shares only 20
    prompts += [prompts[1]] * 2 + [system]  # copies, and the bare prefix (shares 39 of its 40)
    random.Random(0).shuffle(prompts)
    on = _compare(prompts, **overrides)
    assert on.prompt_tokens_reused >= 7 * 20  # at least the 20 tokens the 8 system-prompted ones share


def test_free_rows_apart_and_a_tight_cache_still_give_the_same_results():
    """New rows in two runs (row 1 busy), and a cache so short that a shared row's start plus an
    unshared row's whole prompt (rows 2 and 3) would not fit one forward: the run is cut, results
    unchanged."""
    model = _model()
    long, shared = _ids(60, 6), _ids(50, 7)
    prompts = [shared + [1], long, shared + [2, 3], shared + [4]]
    results = []
    for share in (False, True):
        batch = Batch(model, VOCAB, set(), 6, 72, share_prefix=share)
        busy = [Sequence(_ids(5, 8), _greedy(40), None) for _ in range(2)]
        batch.add(busy)
        batch.remove(busy[0])  # row 1 busy: the new rows are 0 and 2..4
        assert batch.seqs[1] is busy[1]
        results.append((_run(batch, prompts), batch.prompt_tokens_reused))
    (tokens_off, logits_off, _), _ = results[0]
    (tokens_on, logits_on, _), reused = results[1]
    assert tokens_on == tokens_off and reused == 2 * 50
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-5, atol=1e-5)


def test_groups_are_chosen_to_save_the_most():
    template = _ids(20, 9)
    a, b = template + _ids(30, 10), template + _ids(30, 11)
    groups = shared_groups([a, b] * 4)
    assert sorted((p, sorted(m)) for p, m in groups) == [(49, [0, 2, 4, 6]), (49, [1, 3, 5, 7])]
    assert [(p, sorted(m)) for p, m in shared_groups([a, b])] == [(20, [0, 1])]  # one each: the template
    assert shared_groups([_ids(10, 12)] * 3) == []  # shorter than the least worth sharing
    assert [(p, sorted(m)) for p, m in shared_groups([a, a[:17]])] == [(16, [0, 1])]  # a token of its own


# ---- across calls: the prefix cache -------------------------------------------------------------
def test_a_later_add_reuses_the_blocks_an_earlier_one_prefilled():
    model = _model()
    system = _ids(2 * BLOCK + 8, 13)
    first, second = system + [5, 6, 7], system + [9, 10]
    plain = Batch(model, VOCAB, set(), 2, 128)
    cached = Batch(model, VOCAB, set(), 2, 128, prefix_cache_mb=1)
    want = [_run(plain, [p]) for p in (first, second)]
    got = [_run(cached, [p]) for p in (first, second)]
    assert plain.prefix_cache is None and len(cached.prefix_cache) == 2  # the 2 whole blocks of `system`
    assert cached.prompt_tokens_reused == 2 * BLOCK and plain.prompt_tokens_reused == 0
    for (tokens_w, logits_w, _), (tokens_g, logits_g, _) in zip(want, got):
        assert tokens_g == tokens_w
        torch.testing.assert_close(logits_g, logits_w, rtol=1e-5, atol=1e-5)


def _engine() -> Engine:
    return Engine(_model(), _Ids(), torch.device("cpu"))


def _serve(prompts: list[list[int]], prefix_cache_mb: float):
    """Requests one after another through a scheduler: their tokens, the batch's reuse, /metrics."""
    with Scheduler(_engine(), max_batch=2, max_queue=4, prefix_cache_mb=prefix_cache_mb) as sched:
        seqs = []
        for p in prompts:
            seqs.append(Sequence(p, _greedy(12), None))
            sched.submit(seqs[-1:])
            assert sched.wait(seqs[-1:], 60)
        return [s.tokens for s in seqs], sched.batch.prompt_tokens_reused, sched.metrics()


def test_the_server_prefills_a_common_system_prompt_once():
    system = _ids(3 * BLOCK + 5, 14)  # 101 tokens: 3 whole blocks
    prompts = [system + _ids(6, 20 + i) for i in range(3)]
    tokens_off, reused_off, _ = _serve(prompts, 0)
    tokens_on, reused_on, metrics = _serve(prompts, 8)
    assert tokens_on == tokens_off
    assert (reused_off, reused_on) == (0, 2 * 3 * BLOCK)
    assert f"kiln_prompt_tokens_cached_total {2 * 3 * BLOCK}" in metrics


def test_the_prefix_cache_stays_within_its_budget():
    model = _model()
    cfg = model.cfg
    block_bytes = cfg.n_layers * 2 * cfg.n_kv_heads * BLOCK * cfg.head_dim * 4  # float32
    batch = Batch(model, VOCAB, set(), 2, 128, prefix_cache_mb=3 * block_bytes / 2**20)
    prompts = [_ids(2 * BLOCK + 3, 30 + i) for i in range(4)]  # 2 whole blocks each
    for p in prompts:
        _run(batch, [p], 2)
        assert batch.prefix_cache.bytes <= 3 * block_bytes
    assert len(batch.prefix_cache) == 3
    before = batch.prompt_tokens_reused
    _run(batch, [prompts[-1]], 2)  # the newest: both blocks kept
    assert batch.prompt_tokens_reused - before == 2 * BLOCK
    before = batch.prompt_tokens_reused
    _run(batch, [prompts[0]], 2)  # the oldest: gone
    assert batch.prompt_tokens_reused == before


def test_a_hit_keeps_a_prefix_first_blocks_longest():
    cache = PrefixCache(budget=3 * 4, block=2)  # three blocks of one float32 each

    def read(prompt):
        return lambda s, e: torch.tensor([float(prompt[s])])

    long = [1, 2, 3, 4, 5, 6, 7]
    cache.store(long, read(long))  # blocks [1,2] [1..4] [1..6]
    assert [t.item() for t in cache.lookup(long)] == [1.0, 3.0, 5.0]
    other = [9, 9, 8]
    cache.store(other, read(other))  # evicts the least recently used: [1..6], not [1,2]
    assert [t.item() for t in cache.lookup(long)] == [1.0, 3.0]
    assert cache.bytes == 12 and len(cache) == 3
    assert cache.lookup([1, 2]) == []  # a prompt keeps a token of its own


# ---- training-time generation -----------------------------------------------------------------
def test_a_batch_for_a_model_in_training_keeps_no_prefix_cache():
    """GRPO's policy changes every step: its batch (inference=False) shares within one add only."""
    model = _model()
    batch = Batch(model, VOCAB, set(), 8, 128, inference=False, prefix_cache_mb=64)
    assert batch.prefix_cache is None
    prompt = _ids(2 * BLOCK + 8, 40)
    _run(batch, [prompt] * 4)
    assert batch.prompt_tokens_reused == 3 * (len(prompt) - 1)
    _run(batch, [prompt])  # alone, later: prefilled whole again
    assert batch.prompt_tokens_reused == 3 * (len(prompt) - 1)
    plain = generate(model, [prompt] * 4, _greedy(), stop_ids=set())
    trained = generate(model, [prompt] * 4, _greedy(), stop_ids=set(), inference=False)
    assert [s.tokens for s in trained] == [s.tokens for s in plain]


def test_a_wrapped_policy_makes_as_many_forwards_whatever_its_prompts_share(one_rank_group):
    """Ranks of a DDP or FSDP2 policy join each other's forwards: how many `add` makes may not
    depend on what a rank's prompts share. The tokens are those of the plain model."""
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    shared, apart = [_ids(40, 41)] * 4, [_ids(40, 42 + i) for i in range(4)]
    counts, tokens = [], []
    for prompts in (shared, apart):
        calls.clear()
        seqs = generate(ddp, prompts, _greedy(1), stop_ids=set(), inference=False, ranks_in_step=True)
        counts.append(len(calls))
        tokens.append([s.tokens for s in seqs])
    hook.remove()
    assert counts[0] == counts[1]
    assert tokens == [[s.tokens for s in generate(model, p, _greedy(1), stop_ids=set())] for p in (shared, apart)]
