"""Generation from a trained run: KV-cache decoding, sampling controls, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY_TRAIN, kiln
from kiln.config import SampleConfig
from kiln.data.tokenizer import BOS
from kiln.serve.engine import Engine, sample_next


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    import shutil

    out = tmp_path_factory.mktemp("gen") / "run"
    shutil.copytree(prepared, out)
    assert kiln("pretrain", f"out={out}", *TINY_TRAIN, "train.max_steps=30", "train.lr=1e-2") == 0
    return out


def test_greedy_decoding_with_the_cache_equals_recomputing_everything(trained):
    eng = Engine.from_run(trained, "cpu")
    sc = SampleConfig(prompt="def ", max_new_tokens=12, temperature=0.0)
    (text,) = eng.generate(sc.prompt, sc)
    ids = [eng.tokenizer.token_to_id(BOS), *eng.tokenizer.encode(sc.prompt, add_special_tokens=False).ids]
    want = []
    with torch.no_grad():
        for _ in range(12):
            nxt = int(eng.model(torch.tensor([ids]))[0, -1, : eng.tokenizer.get_vocab_size()].argmax())
            if nxt in (eng.tokenizer.token_to_id(BOS), eng.tokenizer.token_to_id("<|eos|>")):
                break
            ids.append(nxt)
            want.append(nxt)
    assert text == eng.tokenizer.decode(want)


def test_same_seed_same_samples_and_different_seed_differs(trained):
    eng = Engine.from_run(trained, "cpu")
    sc = SampleConfig(prompt="import ", max_new_tokens=20, temperature=1.0, top_k=0, num_samples=3, seed=1)
    a, b = eng.generate(sc.prompt, sc), eng.generate(sc.prompt, sc)
    c = eng.generate(sc.prompt, dataclasses.replace(sc, seed=2))
    assert a == b and a != c


def test_top_k_and_top_p_only_ever_pick_allowed_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 2, 1.0, gen)) for _ in range(200)}
    assert picks == {1, 2}
    picks = {int(sample_next(logits, 1.0, 0, 0.5, gen)) for _ in range(200)}
    assert picks == {1}  # token 1 alone holds more than half the mass
    assert int(sample_next(logits, 0.0, 0, 1.0, gen)) == 1


def test_generate_cli_streams_the_completion(trained, capsys):
    assert kiln("generate", f"out={trained}", "prompt=def fibonacci(", "max_new_tokens=8", "seed=0") == 0
    assert capsys.readouterr().out.startswith("def fibonacci(")


def test_speedrun_writes_a_report_with_plot_and_samples(tmp_path, corpus_dir):
    out = tmp_path / "sr"
    assert kiln("speedrun", f"out={out}", f"data.input={corpus_dir}", "data.tokenizer.vocab_size=400",
                *TINY_TRAIN, "train.max_steps=20", "train.eval_every=10", "sample.max_new_tokens=8") == 0
    report = (out / "report.md").read_text()
    assert "![training loss and validation bits per byte](loss.png)" in report and (out / "loss.png").stat().st_size > 0
    assert "bits/byte** vs the unigram baseline" in report
    assert "def fibonacci(n):" in report and "## Samples" in report
