"""`kiln dpo`: the loss and implicit rewards by hand, log-probabilities checked against step-by-step
decoding, the precomputed reference against the live one, and a run whose policy comes to prefer
the held-out chosen replies."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_reward import FAST, base, easy_pairs, write_jsonl  # noqa: F401  (the module's base run)

from conftest import check_plan_vs_run, kiln
from kiln.config import Config, load
from kiln.data.preference_data import PairStats, normalize_row, pair_batch, tokenize_pairs
from kiln.data.tokenizer import PAD, load_tokenizer
from kiln.model.config import preset
from kiln.model.transformer import Transformer
from kiln.train import parallel
from kiln.workloads.dpo import DPO, completion_logps, dpo_loss, precompute_reference


def test_dpo_loss_and_implicit_rewards_by_hand():
    pi_c, pi_r = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0])
    ref_c, ref_r = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -6.0])
    loss, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    assert chosen.tolist() == pytest.approx([0.1, -0.1])  # β (log π − log π_ref)
    assert rejected.tolist() == pytest.approx([-0.1, 0.1])
    # rows: −log σ(0.2) = 0.5981388693, −log σ(−0.2) = 0.7981388693
    assert float(loss) == pytest.approx(0.6981388693, abs=1e-6)


@torch.no_grad()
def test_completion_log_probs_match_token_by_token_decoding(prepared):
    tok = load_tokenizer(prepared / "tokenizer")
    rows = [normalize_row(r, "row") for r in easy_pairs(2)]
    pairs = tokenize_pairs(tok, rows, 64, PairStats())
    batch = pair_batch(pairs, 64, tok.token_to_id(PAD))
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=512))
    m.init_weights(0)
    logp, count = completion_logps(m, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    for i, p in enumerate(pairs):
        want = 0.0
        for t in range(p.prompt_len, len(p.chosen)):  # each completion token given exactly its prefix
            logits = m(torch.tensor([p.chosen[:t]]))[0, -1]
            want += float(logits.log_softmax(-1)[p.chosen[t]])
        assert float(logp[i]) == pytest.approx(want, abs=1e-3)
        assert int(count[i]) == len(p.chosen) - p.prompt_len


@torch.no_grad()
def test_pairs_are_padded_to_their_batch_not_the_context(prepared, monkeypatch):
    """A batch of short pairs is as wide as its longest side (rounded up), not train.seq_len, and
    every score is what a batch padded to the whole context gives; the loader tells the trainer
    how many positions it holds."""
    from kiln.data import preference_data
    from kiln.data.preference_data import PairLoader
    from kiln.model.heads import ScalarHeadModel
    from kiln.workloads.reward import pair_scores

    tok = load_tokenizer(prepared / "tokenizer")
    pairs = tokenize_pairs(tok, [normalize_row(r, "row") for r in easy_pairs(4)], 128, PairStats())
    longest = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    narrow = pair_batch(pairs, 128, tok.token_to_id(PAD))
    width = narrow["chosen_input_ids"].shape[1]
    assert longest <= width < longest + preference_data.PAD_MULTIPLE and width < 128
    monkeypatch.setattr(preference_data, "PAD_MULTIPLE", 128)
    wide = pair_batch(pairs, 128, tok.token_to_id(PAD))
    assert wide["chosen_input_ids"].shape[1] == 128
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=512))
    m.init_weights(0)
    for a, b in zip(completion_logps(m, *(narrow[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels"))),
                    completion_logps(m, *(wide[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels"))),
                    strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    rm = ScalarHeadModel(preset("tiny", vocab_size=512))
    rm.init_weights(0)
    torch.nn.init.normal_(rm.score.weight)  # the head starts at zero: give it something to read
    for a, b in zip(pair_scores(rm, narrow), pair_scores(rm, wide), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    monkeypatch.undo()
    loader = PairLoader(pairs, 2, 128, tok.token_to_id(PAD))
    batch = loader.next_batch()
    assert loader.batch_tokens == 2 * batch["chosen_input_ids"].numel() < loader.tokens_per_batch


def test_the_sft_term_adds_the_chosen_cross_entropy(prepared):
    tok = load_tokenizer(prepared / "tokenizer")
    pairs = tokenize_pairs(tok, [normalize_row(r, "row") for r in easy_pairs(4)], 64, PairStats())
    batch = pair_batch(pairs, 64, tok.token_to_id(PAD))
    m = Transformer(preset("tiny", vocab_size=512))
    m.init_weights(0)
    plain = DPO(0.1, 0.0, reference=m).loss(m, batch)[0].detach()
    with_sft, metrics = DPO(0.1, 2.0, reference=m).loss(m, batch)
    with_sft = with_sft.detach()
    logp, count = completion_logps(m, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    nll_per_token = float(-logp.detach().sum() / count.sum())
    assert float(plain) == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: σ(0) for every pair
    assert float(with_sft) == pytest.approx(math.log(2) + 2.0 * nll_per_token, abs=1e-4)
    assert float(metrics["sft_loss"]) == pytest.approx(nll_per_token, abs=1e-4)


@torch.no_grad()
def test_precomputed_reference_gives_the_same_loss_as_the_live_one(prepared, tmp_path):
    tok = load_tokenizer(prepared / "tokenizer")
    pairs = tokenize_pairs(tok, [normalize_row(r, "row") for r in easy_pairs(6)], 64, PairStats())
    pad = tok.token_to_id(PAD)
    torch.manual_seed(0)
    policy, reference = Transformer(preset("tiny", vocab_size=512)), Transformer(preset("tiny", vocab_size=512))
    policy.init_weights(1)
    reference.init_weights(2)
    live, live_m = DPO(0.1, reference=reference).loss(policy, pair_batch(pairs, 64, pad))
    env = parallel.init_env(load(Config, None, [f"out={tmp_path}", "device=cpu"]))
    precompute_reference(reference, pairs, 4, 64, pad, env, torch.autocast("cpu", enabled=False))
    batch = pair_batch(pairs, 64, pad)
    assert "ref_chosen_logp" in batch
    cached, cached_m = DPO(0.1).loss(policy, batch)  # no reference model at all
    assert float(cached) == pytest.approx(float(live), abs=1e-5)
    assert float(cached_m["rewards_margin"]) == pytest.approx(float(live_m["rewards_margin"]), abs=1e-5)
    assert float(live) != pytest.approx(math.log(2), abs=1e-3)  # the two models differ: a real check


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, base):  # noqa: F811
    d = tmp_path_factory.mktemp("dpo")
    data = write_jsonl(d / "pairs.jsonl", easy_pairs(120))
    out = d / "run"
    assert kiln("dpo", f"out={out}", f"init_from={base}", *FAST, "train.batch_size=8", "train.max_steps=20",
                "train.eval_every=10", "train.eval_batches=4", "train.lr=3e-3", f"preference.data={data}",
                "preference.val_fraction=0.2", "dpo.beta=0.5") == 0
    return out


def test_dpo_raises_the_held_out_preference_of_the_policy_over_its_start(dpo_run):
    lines = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "val_logp_accuracy" in m]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and start["val_rewards_accuracy"] == 0.5  # policy = reference: every reward is 0
    assert end["val_rewards_accuracy"] >= 0.9 and end["val_rewards_margin"] > 0
    assert end["val_logp_margin"] > start["val_logp_margin"]
    train = [m for m in lines if "rewards_chosen" in m]
    assert train and all(k in train[-1] for k in ("rewards_rejected", "rewards_margin", "rewards_accuracy"))
    report = (dpo_run / "report.md").read_text()
    assert "## DPO" in report and "implicit-reward accuracy vs the reference | 50.0% |" in report
    planned = check_plan_vs_run(dpo_run, partial=True)  # pairs padded to their batch: said, not hidden
    assert any("padded" in reason for reason in planned["partial"])
