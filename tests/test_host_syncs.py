"""Host syncs in the hot loops: on a GPU every read of a tensor's value on the host (`.item()`,
`int()`, `float()`, `bool()`, `.tolist()`) waits for every kernel queued before it, so the CPU can
no longer run ahead of the GPU. No GPU here: the reads are counted on CPU, where the code takes the
same paths, by wrapping those methods of `torch.Tensor`.

- A training step reads the device a fixed number of times (the loss and gradient norm the spike
  guard needs, together), however many micro-batches it accumulates: metrics stay tensors until a
  logged step, positions are checked on the device.
- Decoding reads the device once per step (the sampled tokens, which the host needs for stop ids,
  stop strings and streaming), on every path: the fused step, the model's own forward through the
  KV cache, sampling, and every rank stepping together under torch.distributed.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from conftest import TINY_TRAIN
from kiln.config import Config, load
from kiln.data.shards import TokenLoader
from kiln.infer.engine import SamplingParams
from kiln.infer.generate import generate, greedy
from kiln.model.config import preset
from kiln.model.transformer import KVCache, Transformer
from kiln.train import parallel
from kiln.train.objectives import LanguageModeling
from kiln.train.trainer import Trainer
from kiln.workloads.common import model_config_for

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def host_reads():
    """Count every read of a tensor's value on the host while the block runs."""
    counts: Counter = Counter()
    own = {name: torch.Tensor.__dict__.get(name) for name in READS}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)
    try:
        yield counts
    finally:
        for name, was in own.items():
            if was is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, was)


def test_the_counter_sees_each_kind_of_read():
    t = torch.tensor([3.0])
    with host_reads() as n:
        int(t), float(t), bool(t), t.item(), t.tolist(), [0, 1, 2, 3][t.long()[0]]
    assert sum(n.values()) == 6
    assert int(t) == 3  # put back


# ---- training ----------------------------------------------------------------------------------
class WithMetrics(LanguageModeling):
    """Next-token loss that also logs a tensor metric and a plain number, as DPO or GRPO do."""

    def loss(self, model, batch):
        loss, _ = super().loss(model, batch)
        return loss, {"labelled": (batch["labels"] != -100).float().mean(), "constant": 0.1}


def trainer(run_dir, *overrides: str) -> Trainer:
    cfg = load(Config, None, [f"out={run_dir}", *TINY_TRAIN, "train.batch_size=2", "train.document_mask=true",
                              *overrides])
    env = parallel.init_env(cfg)
    torch.manual_seed(0)
    model = parallel.build_model(lambda: Transformer(model_config_for(cfg, 512)), cfg, env, lambda m: m.init_weights(0))
    loader = TokenLoader(run_dir / "data", "train", 2, cfg.train.seq_len, 0, document_mask=True)
    return Trainer(cfg, model, env, loader, WithMetrics())


def test_a_training_step_reads_the_device_as_often_with_4_micro_batches_as_with_1(run_dir):
    """Packed documents (per-row positions) and an objective with metrics: the reads of a step do
    not grow with the accumulation steps (before: 3 per micro-batch)."""
    one, four = trainer(run_dir), trainer(run_dir, "train.tokens_per_step=512")
    assert (one.accum, four.accum) == (1, 4)
    one.train_step(), four.train_step()  # first calls: lazy set-up
    with host_reads() as n1:
        _, _, m1 = one.train_step()
    with host_reads() as n4:
        loss, grad_norm, m4 = four.train_step()
    assert sum(n4.values()) == sum(n1.values()) <= 1, (n1, n4)  # the loss and gradient norm, read together
    assert isinstance(loss, float) and isinstance(grad_norm, float)
    # the metrics stay on the device until a logged step reads them, in one go
    with host_reads() as n:
        read = Trainer.read_metrics(m4)
    assert sum(n.values()) <= 2 and 0 < read["labelled"] <= 1


def test_metrics_read_at_the_logged_step_are_the_micro_batch_means(run_dir):
    """The tensors a step keeps give the figures the per-micro-batch floats did."""
    four = trainer(run_dir, "train.tokens_per_step=512")
    batches = []
    real = four.loader.next_batch

    def keep():
        b = real()
        batches.append(b)
        return b

    four.loader.next_batch = keep
    _, _, m = four.train_step()
    labelled = constant = 0.0  # as the step summed them before, in Python floats
    for b in batches:
        labelled += float((b["labels"] != -100).float().mean()) / 4
        constant += 0.1 / 4
    assert Trainer.read_metrics(m) == {"labelled": labelled, "constant": constant}  # bit for bit


# ---- decoding ----------------------------------------------------------------------------------
def tiny() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=96))
    model.init_weights(3)
    return model.eval()


PROMPTS = [[1, 5, 9, 4], [1, 7], [1, 2, 3]]


def reads_for(model, new_tokens: int, **kw) -> int:
    params = kw.pop("params", None) or greedy(new_tokens)
    if not isinstance(params, SamplingParams):
        params = params(new_tokens)
    generate(model, PROMPTS, params, stop_ids=set(), **kw)  # warm: first calls set things up
    with host_reads() as n:
        seqs = generate(model, PROMPTS, params, stop_ids=set(), **kw)
    assert all(len(s.tokens) == new_tokens for s in seqs)
    return sum(n.values())


def sampled(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.8, top_k=20, top_p=0.9, seed="s")


@pytest.mark.parametrize("how", ["fused", "forward", "sampled", "forward-sampled"])
def test_decoding_reads_the_device_once_per_step(how):
    """8 more tokens cost 8 more reads: the sampled tokens of each step, nothing else (before: 5
    more per step through the model's own forward, which RL's wrapped policy and quantized or LoRA
    models take, and 1 more per step when sampling)."""
    model = tiny()
    kw = {"fused": not how.startswith("forward")}
    if "sampled" in how:
        kw["params"] = sampled
    short, long = reads_for(model, 8, **kw), reads_for(model, 16, **kw)
    assert long - short == 8, (short, long)


def test_ranks_stepping_together_read_the_device_once_per_step(one_rank_group):
    """GRPO's and on-policy distillation's rollouts (`ranks_in_step`): whether any rank still has
    rows to decode is all-reduced every step and read with the step's tokens, not on its own."""
    model = tiny()
    short = reads_for(model, 8, ranks_in_step=True, inference=False)
    long = reads_for(model, 16, ranks_in_step=True, inference=False)
    assert long - short == 8, (short, long)


def test_ranks_stepping_together_still_make_the_same_tokens(one_rank_group):
    model = tiny()
    alone = generate(model, PROMPTS, greedy(6), stop_ids=set())
    together = generate(model, PROMPTS, greedy(6), stop_ids=set(), ranks_in_step=True, inference=False)
    assert [s.tokens for s in together] == [s.tokens for s in alone]


def test_a_kv_cache_told_its_lengths_plans_a_forward_without_reading_them():
    """`KVCache.known(lengths)`: the caller keeps the rows' lengths on the host (the engine does),
    so the cache plans the next forward (attended length, mask, overflow) without a device read;
    without it, one read of all the lengths, not one per question."""
    model = tiny()
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, 16)
        with host_reads() as told:
            first = model(x[:, :6], cache=cache.known([0, 0]))
            rest = [model(x[:, i : i + 1], cache=cache.known([i, i])) for i in range(6, 9)]
        with host_reads() as untold:
            model(x[:, :1], cache=KVCache(model.cfg, 2, 16))
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, atol=1e-5, rtol=1e-5)
    assert sum(told.values()) == 0 and sum(untold.values()) == 1, (told, untold)
    with pytest.raises(ValueError, match="KV cache holds 16 positions; asked for 17"):
        model(x[:, :2], cache=cache.known([15, 15]))


def test_positions_outside_the_context_are_refused_without_a_read():
    model = tiny()
    ok = torch.arange(4)[None]
    with torch.no_grad(), host_reads() as n:
        model(torch.zeros(1, 4, dtype=torch.long), positions=ok)
    assert sum(n.values()) == 0
    bad = ok + model.cfg.max_seq_len - 2
    with torch.no_grad(), pytest.raises(RuntimeError, match="outside 0..model.max_seq_len-1"):
        model(torch.zeros(1, 4, dtype=torch.long), positions=bad)
