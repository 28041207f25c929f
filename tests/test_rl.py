"""`kiln rl` (GRPO): advantages of a known group and the clipped ratio loss by hand, batched KV-cache
sampling against one prompt at a time, rewards that raise, hang or return NaN, the default code
reward (parse + doctests in the sandbox) under attack, and runs that keep going through all of it."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch
from test_compile import eager_backend  # noqa: F401  (compiles with the eager backend)
from test_reward import FAST, base, easy_pairs, write_jsonl  # noqa: F401  (the module's base run)

from conftest import check_plan_vs_run, kiln
from kiln.config import Config, SandboxConfig, load
from kiln.data.preference_default import docstring_prompts
from kiln.errors import KilnError
from kiln.model.config import preset
from kiln.model.transformer import Transformer
from kiln.rewards.code import code_reward, docstring_reward
from kiln.rewards.runner import score_job
from kiln.workloads.rl import body_end, complete, group_advantages, grpo_loss, run_rl

SANDBOX = SandboxConfig(timeout_s=1.0, memory_mb=128, max_output_bytes=65536, max_procs=16)
HEADER = 'def double(x):\n    """Twice x.\n\n    >>> double(2)\n    4\n    """\n'
DOCTEST = "Twice x.\n\n>>> double(2)\n4\n"  # the docstring, as default rows carry it


# ---- the maths -----------------------------------------------------------------------------------
def test_group_advantages_of_a_known_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards, scale=True, eps=0.0)
    # mean 0.5, sample std sqrt(4 · 0.25 / 3) = 0.5773502692 -> ±0.8660254038
    assert adv[0].tolist() == pytest.approx([0.8660254038, -0.8660254038, -0.8660254038, 0.8660254038])
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # no variance, nothing to learn
    assert group_advantages(rewards, scale=False)[0].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_clipped_ratio_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5 against old log-probs of 0
    old, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    up, m = grpo_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    assert float(up) == pytest.approx((-1.2 - 0.5) / 2)  # −min(1.5, 1.2), −min(0.5, 0.8)
    assert float(m["clip_fraction"]) == 1.0
    down, _ = grpo_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2)
    assert float(down) == pytest.approx((1.5 + 0.8) / 2)  # −min(−1.5, −1.2), −min(−0.5, −0.8)
    only_first = torch.tensor([[True, False]])
    assert float(grpo_loss(logp, old, torch.tensor([1.0]), only_first, 0.2)[0]) == pytest.approx(-1.2)
    with_kl, m = grpo_loss(logp, old, torch.tensor([1.0]), only_first, 0.2, ref_logp=torch.zeros(1, 2), kl_coef=0.5)
    kl = 1 / 1.5 + math.log(1.5) - 1  # exp(ref − logp) − (ref − logp) − 1 = 0.0721318...
    assert float(m["kl"]) == pytest.approx(kl, abs=1e-6)
    assert float(with_kl) == pytest.approx(-1.2 + 0.5 * kl, abs=1e-6)


def test_a_clipped_token_gets_no_gradient():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _ = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0  # ratio 1.5 > 1.2 with a positive advantage: clipped
    assert logp.grad[0, 1] == pytest.approx(-1.1 / 2)  # inside the clip range: −A·ρ / tokens


# ---- sampling ------------------------------------------------------------------------------------
@torch.no_grad()
def test_batched_sampling_matches_each_prompt_alone():
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=96))
    m.init_weights(3)
    m.eval()
    prompts = [[1, 5, 9], [1, 7, 8, 20, 30, 4, 2], [1, 40]]
    batched = complete(m, prompts, 6, 0.0, 0, 1.0, "test", stop_ids={95}, vocab=96)
    for p, got in zip(prompts, batched, strict=True):
        seq = list(p)
        for _ in range(6):  # greedy, the whole sequence each step, no cache
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert got.prompt == p and got.ids == seq[len(p):] and got.healed == ""


def test_a_text_completion_ends_where_the_function_does():
    assert body_end("    return x\n\ndef other():\n") == 13
    assert body_end("    if x:\n        return 1\n    return 2") is None


# ---- rewards -------------------------------------------------------------------------------------
def misbehaving_reward(prompt: str, completion: str, mode: str = "ok", **_) -> float:
    """A user reward that fails in the ways a real one can, by the prompt row's `mode`."""
    if mode == "raise":
        raise ZeroDivisionError("bug in the reward")
    if mode == "hang":
        while True:
            time.sleep(0.01)
    if mode == "nan":
        return float("nan")
    if mode == "text":
        return "high"  # type: ignore[return-value]
    if mode == "attack":
        return code_reward(prompt, _["body"], entry_point="double", header=HEADER, doctest=DOCTEST, sandbox=_["sandbox"])
    return len(completion) / 100


def job(mode: str, **fields) -> dict:
    return {"reward": "test_rl:misbehaving_reward", "prompt": "p", "completion": "c", "timeout_s": 0.5,
            "fields": {"mode": mode, **fields}, "sandbox": SANDBOX.__dict__}


def test_a_reward_that_raises_hangs_or_returns_nan_scores_zero_with_its_reason():
    assert score_job(job("raise")) == (0.0, "reward_error")
    t0 = time.perf_counter()
    assert score_job(job("hang")) == (0.0, "reward_timeout")
    assert time.perf_counter() - t0 < 3
    assert score_job(job("nan")) == (0.0, "reward_nan")
    assert score_job(job("text")) == (0.0, "reward_not_a_number")
    assert score_job(job("ok")) == (0.01, "scored")


def test_the_docstring_task_pays_word_overlap_with_the_real_docstring():
    assert docstring_reward("", "Return the size of the chunk.", reference="Return the size of the current chunk.") \
        == (pytest.approx(12 / 13), "f1_partial")  # precision 6/6, recall 6/7
    assert docstring_reward("", "return THE size", reference="Return the size.") == (1.0, "f1_exact")
    assert docstring_reward("", "Open a socket.", reference="Return the size.") == (0.0, "f1_zero")
    assert docstring_reward("", "  \n", reference="Return the size.") == (0.0, "empty")
    train, val = docstring_prompts(60, 0.1)
    assert len(val) >= 4 and all(r["prompt"].startswith("Write the docstring for this function.") for r in train + val)
    held_out = {r["source"].split(":")[0] for r in val}
    assert held_out.isdisjoint(r["source"].split(":")[0] for r in train)  # held-out modules, as the pairs


def test_the_default_code_reward():
    assert code_reward("", "    return x * 2\n", entry_point="double", header=HEADER) == (1.0, "parsed")
    assert code_reward("", "    return x *\n", entry_point="double", header=HEADER) == (0.0, "syntax_error")
    for stub in ("    pass\n", "    return\n", "    return None\n", "    raise NotImplementedError()\n", ""):
        assert code_reward("", stub, entry_point="double", header=HEADER) == (0.0, "empty_body")
    # chat format: the whole function, fenced
    whole = "```python\ndef double(x):\n    return x + x\n```"
    assert code_reward("", whole, entry_point="double", header=HEADER, doctest=DOCTEST, sandbox=SANDBOX) == \
        (1.0, "doctest_passed")
    assert code_reward("", "    return x * 3\n", entry_point="double", header=HEADER, doctest=DOCTEST,
                       sandbox=SANDBOX) == (0.0, "doctest_failed")


def test_the_code_reward_refuses_bodies_a_linter_would_flag():
    """What GRPO found on a 4M model rewarded for parsing: `return os`, `return self.module` —
    bodies that parse, are no stub, and cannot be the function."""
    names = ["os", "helper"]  # what the function's module binds
    assert code_reward("", "    return os\n", entry_point="double", header=HEADER, module_names=names) == \
        (0.0, "ignores_arguments")
    assert code_reward("", "    return self.module + x\n", entry_point="double", header=HEADER,
                       module_names=names) == (0.0, "undefined_name")
    for body in ("    return helper(x) + len(os.sep)\n",  # module names and builtins
                 "    y = [i for i in range(x)]\n    for k in y:\n        x += k\n    return x\n",  # its own names
                 "    try:\n        return x * 2\n    except TypeError as e:\n        raise ValueError(e)\n"):
        assert code_reward("", body, entry_point="double", header=HEADER, module_names=names) == (1.0, "parsed")
    # a module whose names are unknown (a `*` import) checks the arguments only
    assert code_reward("", "    return x + unknown\n", entry_point="double", header=HEADER) == (1.0, "parsed")
    # what GRPO found next, each in turn: the argument handed back, a nested definition never used,
    # a no-op behind a test; and a nested function's parameter binds nothing in the outer body
    assert code_reward("", "    return x\n", entry_point="double", header=HEADER, module_names=names) == \
        (0.0, "returns_argument")
    for body in ("    def __init__(self):\n        return x\n", "    if isinstance(x, str):\n        return None\n"):
        assert code_reward("", body, entry_point="double", header=HEADER, module_names=names) == (0.0, "empty_body")
    assert code_reward("", "    def g(self):\n        return 1\n    return self.y + x\n", entry_point="double",
                       header=HEADER, module_names=names) == (0.0, "undefined_name")
    # a closure reading the argument uses it
    assert code_reward("", "    def g():\n        return x * 2\n    return g()\n", entry_point="double",
                       header=HEADER, module_names=names) == (1.0, "parsed")


def test_only_doctests_that_call_the_function_itself_count():
    """`>>> subprocess.getoutput(...)` in `getoutput`'s docstring tests the module's copy: any body
    would pass it (GRPO's `def __init__(self): return cmd` did)."""
    from kiln.data.preference_default import Function, _calls_itself

    def fn(doc: str) -> Function:
        return Function("m.py", "getoutput", "Run a command.", "", "", doc, "", True)

    assert _calls_itself(fn(">>> getoutput('ls')\n'x'\n"))
    assert _calls_itself(fn(">>> x = getoutput ('ls')\n"))
    assert not _calls_itself(fn(">>> subprocess.getoutput('ls')\n'x'\n"))
    assert not _calls_itself(fn(">>> my_getoutput('ls')\n'x'\n"))


def test_the_default_rl_prompts_are_the_headers_and_their_functions_pass_the_reward():
    """The text prompt is the function's header as written (ending in the docstring's newline,
    which the rollouts heal), and the real body, completing it, earns the reward: the static checks
    pass nearly every real standard-library function."""
    from types import SimpleNamespace

    from kiln.data.preference_default import _body_of, default_prompts

    train, val = default_prompts(120, 0.2)
    passed = 0
    for row in train + val:
        assert row["prompt"] == row["header"] and row["prompt"].endswith("\n")
        file, name = row["source"].rsplit(":", 1)
        real = _body_of(SimpleNamespace(file=file, name=name))
        value, why = code_reward(row["prompt"], real, entry_point=row["entry_point"], header=row["header"],
                                 module_names=row["module_names"])
        passed += value == 1.0
    assert passed >= 0.95 * len(train + val)


# attack body -> the reasons it may end with (the doctest runner catches what the example raises);
# each reads its argument first, as the static check before the sandbox asks of every body
READS_X = "    _ = x\n"
ATTACKS = {
    "loops forever": ("    while True:\n        pass\n", {"sandbox_timeout"}),
    "allocates 10 GB": ("    return len(bytearray(10 * 2**30))\n", {"doctest_MemoryError"}),
    # NPROC caps the processes; the ones that exit make room for others, so the clock may end it
    "forks repeatedly": ("    import os\n    while True:\n        os.fork()\n",
                         {"doctest_BlockingIOError", "sandbox_process_limit", "sandbox_timeout"}),
    "prints 1 GB": ("    import os\n    for _ in range(2**14):\n        os.write(1, b'x' * 2**16)\n",
                    {"sandbox_output_limit"}),
    "opens a socket": ("    import socket\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n    return 4\n",
                       {"doctest_OSError", "doctest_ConnectionRefusedError"}),
    "reads the environment": ("    import os\n    return 4 if 'KILN_TEST_SECRET' in os.environ else 5\n",
                              {"doctest_failed"}),
}
ATTACKS = {name: (READS_X + body, reasons) for name, (body, reasons) in ATTACKS.items()}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacking_completions_score_zero_with_a_reason(name, monkeypatch):
    monkeypatch.setenv("KILN_TEST_SECRET", "x")
    body, reasons = ATTACKS[name]
    value, why = code_reward("", body, entry_point="double", header=HEADER, doctest=DOCTEST, sandbox=SANDBOX)
    assert value == 0.0 and why in reasons


def test_deleting_files_outside_the_sandbox_changes_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    body = READS_X + f"    import os, shutil\n    os.remove({str(victim)!r})\n    shutil.rmtree({str(tmp_path)!r})\n    return 4\n"
    value, why = code_reward("", body, entry_point="double", header=HEADER, doctest=DOCTEST, sandbox=SANDBOX)
    assert value == 0.0 and why.startswith("doctest_")
    assert victim.read_text() == "keep"


# ---- runs ----------------------------------------------------------------------------------------
RL_FAST = [*FAST, "train.log_every=1", "model.max_seq_len=128", "train.seq_len=96", "rl.max_new_tokens=16", "rl.executor.workers=1",
           "train.lr=1e-2", "train.warmup_steps=1", "rl.sandbox.timeout_s=1", "rl.sandbox.memory_mb=128"]


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, base):  # noqa: F811
    """Training prompts whose rewards misbehave (raise, hang, NaN) or run attacking code in the
    sandbox, plus a malformed row and a prompt longer than the context: the run must go through."""
    d = tmp_path_factory.mktemp("rl")
    victim = d / "victim.txt"
    victim.write_text("keep")
    attacks = [b for b, _ in ATTACKS.values()] + [READS_X + f"    import os\n    os.remove({str(victim)!r})\n    return 4\n"]
    rows = [{"prompt": "def a(x):\n", "mode": m} for m in ("raise", "hang", "nan")]
    rows += [{"prompt": f"def b{i}(x):\n", "mode": "attack", "body": body} for i, body in enumerate(attacks)]
    rows += ["{broken", {"prompt": "x = 1\n" * 200, "mode": "ok"}]
    prompts = write_jsonl(d / "prompts.jsonl", rows)
    val = write_jsonl(d / "val.jsonl", [{"prompt": f"def c{i}(y):\n", "mode": "ok"} for i in range(4)])
    out = d / "run"
    assert kiln("rl", f"out={out}", f"init_from={base}", *RL_FAST, f"rl.prompts={prompts}", f"rl.val_prompts={val}",
                "rl.reward=test_rl:misbehaving_reward", "rl.reward_timeout_s=2", "rl.prompts_per_step=5",
                "rl.group_size=2", "train.max_steps=4", "train.eval_every=2", "rl.kl_coef=0.1",
                "rl.updates_per_rollout=2") == 0
    return out, victim


def test_a_run_goes_through_failing_rewards_and_attacks_counting_each(rl_run):
    out, victim = rl_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "reward_mean" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    for key in ("reward_std", "kl", "completion_tokens", "zero_variance_groups", "clip_fraction"):
        assert key in steps[-1]
    reasons = {k for m in steps for k in m if k.startswith("reason_")}
    assert {"reason_reward_error", "reason_reward_timeout", "reason_reward_nan", "reason_sandbox_timeout"} <= reasons
    assert victim.read_text() == "keep"
    evals = [m for m in lines if "val_reward" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    report = (out / "report.md").read_text()
    assert "## GRPO" in report and "prompts skipped: malformed 1, prompt_too_long 1" in report
    assert "reward_timeout" in report and (out / "rl_reward.png").is_file()
    # what the policy wrote for each held-out prompt at each evaluation, quoted in the report
    samples = [json.loads(line) for line in (out / "rl_samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in samples}) == [0, 2, 4] and len(samples) == 3 * 4
    assert all({"prompt", "completion", "reward", "reason"} <= set(r) for r in samples)
    assert {r["prompt"] for r in samples} == {f"def c{i}(y):\n" for i in range(4)}
    assert "Held-out greedy completions" in report and "- step 4, reward" in report
    planned = check_plan_vs_run(out, partial=True)  # rollouts run inside each step: not planned, and said so
    assert planned["predicted"]["memory"]["frozen_weights"] > 0  # the KL reference's weights are


def test_a_resumed_rl_run_keeps_every_section_of_its_report(tmp_path, rl_run):
    """A resumed GRPO run that finishes rebuilds report.md from every stage's section: its own
    (replaced, with the new last step) and the training section both stay, once each."""
    out = tmp_path / "run"
    shutil.copytree(rl_run[0], out)
    assert kiln("rl", f"out={out}", "resume=auto", "train.max_steps=6", "train.eval_every=6") == 0
    report = (out / "report.md").read_text()
    assert report.count("## GRPO") == 1 and report.count("## Training") == 1, report
    assert "- step 6, reward" in report


def test_rollouts_are_reused_for_updates_per_rollout_steps(rl_run):
    out, _ = rl_run
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward_mean" in m]
    assert steps[0]["reward_mean"] == steps[1]["reward_mean"] and steps[0]["clip_fraction"] == 0.0
    # tokens/s and MFU count the positions each update trains on: 10 rows padded to the rollout's
    # longest (a prompt of a few tokens, at most 16 new ones), not to train.seq_len (96 each)
    added = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *steps], steps)]
    assert all(0 < n <= 10 * 40 for n in added) and added[0] == added[1] and added[2] == added[3], added


@pytest.fixture(scope="module")
def tiny_reward_run(tmp_path_factory, base):  # noqa: F811
    d = tmp_path_factory.mktemp("rm")
    data = write_jsonl(d / "pairs.jsonl", easy_pairs(40))
    out = d / "run"
    assert kiln("reward", f"out={out}", f"init_from={base}", *FAST, "train.max_steps=2", f"preference.data={data}") == 0
    return out


def test_rewards_can_come_from_a_reward_model_run(tmp_path, base, tiny_reward_run):  # noqa: F811
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Please answer {i}."} for i in range(12)])
    out = tmp_path / "run"
    assert kiln("rl", f"out={out}", f"init_from={base}", *RL_FAST, f"rl.prompts={prompts}", "rl.format=chat",
                f"rl.reward_model={tiny_reward_run}", "rl.prompts_per_step=2", "rl.group_size=2",
                "train.max_steps=1", "rl.eval_prompts=2") == 0
    step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in line][0]
    assert step["reason_reward_model"] == 4 and step["reward_std"] > 0  # real scores, not a constant


def test_a_reward_model_of_another_tokenizer_is_refused(tmp_path, base, tiny_reward_run):  # noqa: F811
    other = tmp_path / "other"
    shutil.copytree(tiny_reward_run, other)
    tok_file = other / "tokenizer" / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    tok["added_tokens"][0]["content"] = "<|start|>"
    tok_file.write_text(json.dumps(tok))
    from kiln.runs import sha256_file

    for info_file in (other / "checkpoints").glob("step_*/checkpoint.json"):  # a run trained with that tokenizer
        info = json.loads(info_file.read_text())
        info["tokenizer_sha256"] = sha256_file(tok_file)
        info_file.write_text(json.dumps(info))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Please answer {i}."} for i in range(12)])
    cfg = load(Config, None, [f"out={tmp_path / 'run'}", f"init_from={base}", *RL_FAST, f"rl.prompts={prompts}",
                              f"rl.reward_model={other}"])
    with pytest.raises(KilnError, match="trained with a different tokenizer than the policy"):
        run_rl(cfg)


def test_an_unknown_reward_function_is_one_line(tmp_path, base):  # noqa: F811
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"def f{i}():\n"} for i in range(12)])
    cfg = load(Config, None, [f"out={tmp_path / 'run'}", f"init_from={base}", *RL_FAST, f"rl.prompts={prompts}",
                              "rl.reward=no_such_module:fn"])
    with pytest.raises(KilnError, match=r"rl.reward='no_such_module:fn' cannot be imported"):
        run_rl(cfg)


def vowel_share(prompt: str, completion: str, **_) -> float:
    """A reward a barely trained model can climb: the share of vowels in its completion."""
    return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


def test_grpo_raises_the_reward(tmp_path, base):  # noqa: F811
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"def f{i}(x):\n"} for i in range(10)])
    out = tmp_path / "run"
    assert kiln("rl", f"out={out}", f"init_from={base}", *RL_FAST, f"rl.prompts={prompts}", "rl.reward=test_rl:vowel_share",
                "rl.max_new_tokens=8", "rl.group_size=8", "rl.prompts_per_step=2", "train.max_steps=12",
                "rl.eval_prompts=0") == 0
    rewards = [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if '"reward_mean"' in line]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05


@pytest.mark.slow
def test_rewards_run_as_ray_tasks(tmp_path, base, monkeypatch):  # noqa: F811
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'kiln[data]'")
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the reward's module, on the workers too
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"def f{i}(x):\n", "mode": "raise" if i % 2 else "ok"}
                                                  for i in range(10)])
    out = tmp_path / "run"
    assert kiln("rl", f"out={out}", f"init_from={base}", *RL_FAST, f"rl.prompts={prompts}",
                "rl.reward=test_rl:misbehaving_reward", "rl.executor.kind=ray", "rl.executor.workers=2",
                "rl.group_size=2", "rl.prompts_per_step=4", "train.max_steps=1", "rl.eval_prompts=0") == 0
    step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in line][0]
    assert step.get("reason_reward_error", 0) + step.get("reason_scored", 0) == 8


def test_a_reward_module_in_the_working_directory_imports_as_docs_say(tmp_path, monkeypatch):
    """`kiln rl rl.reward=my_rewards:score` with my_rewards.py where the user runs kiln (no PYTHONPATH)."""
    (tmp_path / "my_rewards_here.py").write_text("def score(prompt, completion, **_):\n    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".", str(tmp_path))])
    job = {"reward": "my_rewards_here:score", "prompt": "p", "completion": "c", "fields": {}, "timeout_s": 5.0,
           "sandbox": {}}
    assert score_job(job) == (0.25, "scored")


def test_grpo_trains_with_compile_on(tmp_path, base, eager_backend):  # noqa: F811
    """GRPO used to refuse train.compile=on: its rollouts decode through the policy with a KV cache.
    Now the policy and its reference (a KL term) are compiled and the rollouts run the policy's
    blocks eagerly."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"def f{i}(x):\n"} for i in range(4)])
    out = tmp_path / "run"
    assert kiln("rl", f"out={out}", f"init_from={base}", *RL_FAST, f"rl.prompts={prompts}", "rl.reward=test_rl:vowel_share",
                "train.compile=on", "rl.max_new_tokens=8", "rl.group_size=2", "rl.prompts_per_step=2",
                "rl.kl_coef=0.1", "train.max_steps=2", "rl.eval_prompts=0") == 0
    rewards = [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()
               if '"reward_mean"' in line]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
