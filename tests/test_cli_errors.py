"""Every verb, run for real (`python -m kiln VERB ...`), meets bad input with exit code 2 and one line on
stderr, never a traceback; the same holds for a distributed launch, and for a reader that leaves early.

The table is per verb: a verb added to `kiln.cli.VERBS` must add its own bad values here (a test
checks that every verb has them). Each case fails at config load, before any data or model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import TINY_TRAIN, kiln
from kiln import cli
from kiln import config as C

REPO = Path(__file__).resolve().parent.parent
OUT = "out={tmp}/run"  # {tmp} becomes a fresh directory per case

# verb -> [(case id, arguments, a fragment the one line must hold)]
BAD: dict[str, list[tuple[str, list[str], str]]] = {
    "prepare": [
        ("misspelt key", [OUT, "data.inptu=x"], "did you mean 'data.input'?"),
        ("key in the wrong section", [OUT, "data.vocab_size=300"], "did you mean 'data.tokenizer.vocab_size'"),
        ("wrong type", [OUT, "data.max_docs=lots"], "'data.max_docs' = 'lots' is not int; write a whole number"),
        ("fraction above 1", [OUT, "data.val_fraction=1.5"], "'data.val_fraction' = 1.5 is out of range: it must be > 0 and < 1"),
        ("vocab too small for byte-level BPE", [OUT, "data.tokenizer.vocab_size=100"], "must be ≥ 264"),
        ("negative workers", [OUT, "data.executor.workers=-1"], "'data.executor.workers' = -1 is out of range"),
        ("unknown format", [OUT, "data.reader.format=csv"], "is not 'auto' | 'stdlib'"),
        ("bad list", [OUT, "data.stages=[clean, length"], "write data.stages=a,b or data.stages=[a, b]"),
        ("bad bool", [OUT, "data.strict=maybe"], "'data.strict' = 'maybe' is not bool; write true or false"),
        ("unknown data kind", [OUT, "data.kind=audio"], "'data.kind' = 'audio' is not 'text' | 'images'"),
        ("image size below 4", [OUT, "data.kind=images", "data.images.size=2"], "'data.images.size' = 2 is out of range"),
        ("unknown image mode", [OUT, "data.images.mode=CMYK"], "'data.images.mode' = 'CMYK' is not 'RGB' | 'L'"),
        ("test share of 1", [OUT, "data.images.test_fraction=1"], "it must be > 0 and < 1"),
    ],
    "pretrain": [
        ("misspelt key", [OUT, "train.max_step=3"], "did you mean 'train.max_steps'?"),
        ("bad preset", [OUT, "model.preset=tiyn"], "did you mean 'tiny'?"),
        ("zero batch", [OUT, "train.batch_size=0"], "'train.batch_size' = 0 is out of range: it must be ≥ 1"),
        ("negative batch", [OUT, "train.batch_size=-3"], "'train.batch_size' = -3 is out of range: it must be ≥ 1"),
        ("negative lr", [OUT, "train.lr=-1"], "'train.lr' = -1.0 is out of range: it must be > 0"),
        ("negative steps", [OUT, "train.max_steps=-5"], "'train.max_steps' = -5 is out of range: it must be ≥ 1"),
        ("fraction above 1", [OUT, "data.val_fraction=1.5"], "it must be > 0 and < 1"),
        ("negative temperature", [OUT, "sample.temperature=-1"], "'sample.temperature' = -1.0 is out of range"),
        ("fractional steps", [OUT, "train.max_steps=2.5"], "'train.max_steps' = '2.5' is not int"),
        ("unknown schedule", [OUT, "train.schedule=linear"], "is not 'cosine' | 'wsd' | 'constant'"),
        ("zero layers", [OUT, "model.n_layers=0"], "'model.n_layers' = 0 is out of range: it must be ≥ 1"),
        ("impossible shape", [OUT, "model.d_model=100"], "model.d_model=100 is not divisible by model.n_heads=6"),
        ("dp_shard below -1", [OUT, "parallel.dp_shard=-2"], "'parallel.dp_shard' = -2 is out of range: it must be ≥ -1"),
        ("bad list", [OUT, "train.freeze={a: 1}"], "'train.freeze[0]' = {'a': 1} is not str"),
        ("not key=value", [OUT, "train.max_steps"], "override 'train.max_steps' is not key=value"),
        ("bad process count", ["--nproc-per-node", "0", OUT], "is not a process count"),
    ],
    "sft": [
        ("misspelt key", [OUT, "sft.dta=x.jsonl"], "did you mean 'sft.data'?"),
        ("negative LoRA rank", [OUT, "lora.rank=-1"], "'lora.rank' = -1 is out of range: it must be ≥ 0"),
        ("LoRA dropout of 1", [OUT, "lora.dropout=1"], "'lora.dropout' = 1.0 is out of range: it must be ≥ 0 and < 1"),
        ("unknown LoRA target", [OUT, "lora.targets=wq,lm_head"], "lora.targets=['wq', 'lm_head'] must be a non-empty list of wq"),
        ("unknown too_long policy", [OUT, "sft.too_long=cut"], "'sft.too_long' = 'cut' is not 'drop' | 'truncate'"),
        ("zero held-out share", [OUT, "sft.val_fraction=0"], "'sft.val_fraction' = 0.0 is out of range: it must be > 0 and < 1"),
        ("negative eval prompts", [OUT, "sft.eval_prompts=-2"], "'sft.eval_prompts' = -2 is out of range: it must be ≥ 0"),
    ],
    "reward": [
        ("misspelt key", [OUT, "preference.dta=x.jsonl"], "did you mean 'preference.data'?"),
        ("held-out share of 1", [OUT, "preference.val_fraction=1"], "'preference.val_fraction' = 1.0 is out of range"),
        ("negative pair count", [OUT, "preference.max_pairs=-1"], "'preference.max_pairs' = -1 is out of range: it must be ≥ 0"),
    ],
    "dpo": [
        ("misspelt key", [OUT, "dpo.bta=0.1"], "did you mean 'dpo.beta'?"),
        ("zero beta", [OUT, "dpo.beta=0"], "'dpo.beta' = 0.0 is out of range: it must be > 0"),
        ("negative SFT weight", [OUT, "dpo.sft_weight=-1"], "'dpo.sft_weight' = -1.0 is out of range: it must be ≥ 0"),
    ],
    "rl": [
        ("group of one", [OUT, "rl.group_size=1"], "'rl.group_size' = 1 is out of range: it must be ≥ 2"),
        ("clip of 1", [OUT, "rl.clip_eps=1"], "'rl.clip_eps' = 1.0 is out of range: it must be > 0 and < 1"),
        ("unknown format", [OUT, "rl.format=json"], "'rl.format' = 'json' is not 'auto' | 'chat' | 'text'"),
        ("sandbox without memory", [OUT, "rl.sandbox.memory_mb=1"], "'rl.sandbox.memory_mb' = 1 is out of range"),
        ("zero temperature", [OUT, "rl.temperature=0"], "'rl.temperature' = 0.0 is out of range: it must be > 0"),
    ],
    "generate": [
        ("misspelt bare key", [OUT, "temprature=0.5"], "did you mean 'sample.temperature'?"),
        ("negative temperature", [OUT, "temperature=-1"], "'sample.temperature' = -1.0 is out of range: it must be ≥ 0"),
        ("top_p of 0", [OUT, "top_p=0"], "'sample.top_p' = 0.0 is out of range: it must be > 0 and ≤ 1"),
        ("top_p above 1", [OUT, "sample.top_p=1.5"], "it must be > 0 and ≤ 1"),
        ("negative top_k", [OUT, "top_k=-1"], "'sample.top_k' = -1 is out of range: it must be ≥ 0"),
        ("no new tokens", [OUT, "max_new_tokens=0"], "'sample.max_new_tokens' = 0 is out of range"),
        ("wrong type", [OUT, "num_samples=two"], "'sample.num_samples' = 'two' is not int"),
        ("bad list", [OUT, "report_prompts=[a"], "write sample.report_prompts=a,b or sample.report_prompts=[a, b]"),
    ],
    "serve": [
        ("misspelt bare key", [OUT, "max_bach=4"], "did you mean 'serve.max_batch'?"),
        ("port out of range", [OUT, "port=70000"], "'serve.port' = 70000 is out of range: it must be ≥ 0 and ≤ 65535"),
        ("zero batch", [OUT, "max_batch=0"], "'serve.max_batch' = 0 is out of range: it must be ≥ 1"),
        ("zero read timeout", [OUT, "read_timeout_s=0"], "'serve.read_timeout_s' = 0.0 is out of range"),
        ("unknown dtype", [OUT, "dtype=int3"], "is not 'auto' | 'fp32'"),
        ("no key off loopback", [OUT, "host=0.0.0.0"], "serve.host=0.0.0.0 listens beyond this machine and needs an API key"),
    ],
    "speedrun": [
        ("misspelt key", [OUT, "trian.max_steps=3"], "did you mean 'train.max_steps'?"),
        ("bad preset", [OUT, "model.preset=smal"], "did you mean 'small'?"),
        ("zero steps", [OUT, "train.max_steps=0"], "'train.max_steps' = 0 is out of range"),
        ("zero validation share", [OUT, "data.val_fraction=0"], "'data.val_fraction' = 0.0 is out of range"),
        ("bad list", [OUT, "data.stages=[clean"], "write data.stages=a,b"),
        ("unknown stage", [OUT, "speedrun.stages=sft,ppo"], "'speedrun.stages[1]' = 'ppo' is not 'sft' | 'dpo'"),
        ("dpo without sft", [OUT, "speedrun.stages=dpo"], "speedrun.stages has 'dpo' without 'sft'"),
        ("zero rl steps", [OUT, "speedrun.rl_steps=0"], "'speedrun.rl_steps' = 0 is out of range"),
    ],
    "export": [
        ("unknown format", [OUT, "format=onnx"], "'export.format' = 'onnx' is not 'hf' | 'gguf'"),
        ("unknown dtype", [OUT, "dtype=int8"], "'export.dtype' = 'int8' is not 'float32' | 'bfloat16' | 'float16'"),
        ("misspelt key", [OUT, "export.fromat=hf"], "did you mean 'export.format'?"),
    ],
    "import": [
        ("two paths", ["{tmp}/a", "{tmp}/b", OUT], "override '{tmp}/b' is not key=value"),
        ("bad bool", [OUT, "allow_pickle=maybe"], "'hf_import.allow_pickle' = 'maybe' is not bool"),
        ("misspelt key", [OUT, "alow_pickle=true"], "did you mean 'hf_import.allow_pickle'?"),
    ],
    "eval": [
        ("negative windows", [OUT, "windows=-1"], "'eval.windows' = -1 is out of range: it must be ≥ 0"),
        ("zero batch", [OUT, "batch_size=0"], "'eval.batch_size' = 0 is out of range: it must be ≥ 1"),
        ("wrong type", [OUT, "num_examples=lots"], "'eval.num_examples' = 'lots' is not int"),
        ("bad bool", [OUT, "tasks=maybe"], "'eval.tasks' = 'maybe' is not bool"),
        ("misspelt key", [OUT, "harness_task=x"], "did you mean 'eval.harness_tasks'?"),
    ],
    "quantize": [
        ("unknown format", [OUT, "format=int3"], "'quantize.format' = 'int3' is not 'int8' | 'int4'"),
        ("unknown method", [OUT, "method=awq"], "'quantize.method' = 'awq' is not 'rtn' | 'gptq'"),
        ("zero group size", [OUT, "group_size=0"], "'quantize.group_size' = 0 is out of range: it must be ≥ 1"),
        ("zero calibration windows", [OUT, "calib_sequences=0"], "'quantize.calib_sequences' = 0 is out of range"),
        ("misspelt key", [OUT, "quantize.fromat=int4"], "did you mean 'quantize.format'?"),
    ],
    "distill": [
        ("alpha above 1", [OUT, "distill.alpha=1.5"], "'distill.alpha' = 1.5 is out of range: it must be ≥ 0 and ≤ 1"),
        ("zero temperature", [OUT, "distill.temperature=0"], "'distill.temperature' = 0.0 is out of range: it must be > 0"),
        ("unknown divergence", [OUT, "distill.divergence=kl"], "is not 'forward_kl' | 'reverse_kl' | 'jsd'"),
        ("jsd beta of 1", [OUT, "distill.jsd_beta=1"], "'distill.jsd_beta' = 1.0 is out of range: it must be > 0 and < 1"),
        ("zero top-k", [OUT, "distill.top_k=0"], "'distill.top_k' = 0 is out of range: it must be ≥ 1"),
        ("misspelt key", [OUT, "distill.teachr=runs/x"], "did you mean 'distill.teacher'?"),
    ],
    "vision": [
        ("unknown arch", [OUT, "vision.arch=resnet"], "'vision.arch' = 'resnet' is not 'vit' | 'cnn'"),
        ("zero patch size", [OUT, "vision.patch_size=0"], "'vision.patch_size' = 0 is out of range: it must be ≥ 1"),
        ("negative rotation", [OUT, "vision.augment.rotation=-5"], "'vision.augment.rotation' = -5.0 is out of range"),
        ("crop share above 1", [OUT, "vision.augment.crop_scale=1.5"], "it must be > 0 and ≤ 1"),
        ("unknown comparison", [OUT, "vision.compare=resnet"], "'vision.compare[0]' = 'resnet' is not 'no-augment'"),
        ("misspelt key", [OUT, "vision.augment.flipp=true"], "did you mean 'vision.augment.flip'?"),
    ],
    "encoder": [
        ("zero mask rate", [OUT, "encoder.mask_rate=0"], "'encoder.mask_rate' = 0.0 is out of range: it must be > 0 and < 1"),
        ("shares above 1", [OUT, "encoder.mask_token=0.8", "encoder.random_token=0.3"], "exceeds 1"),
        ("misspelt key", [OUT, "encoder.mask_rat=0.1"], "did you mean 'encoder.mask_rate'?"),
    ],
    "classify": [
        ("unknown pooling", [OUT, "classify.pooling=max"], "'classify.pooling' = 'max' is not 'mean' | 'bos'"),
        ("test share of 1", [OUT, "classify.test_fraction=1"], "'classify.test_fraction' = 1.0 is out of range"),
        ("negative cap", [OUT, "classify.max_per_class=-1"], "'classify.max_per_class' = -1 is out of range"),
    ],
    "scale": [
        ("misspelt key", [OUT, "scale.widht=[64]"], "did you mean 'scale.widths'?"),
        ("negative bootstrap", [OUT, "scale.bootstrap=-1"], "'scale.bootstrap' = -1 is out of range"),
        ("zero min steps", [OUT, "scale.min_steps=0"], "'scale.min_steps' = 0 is out of range"),
    ],
    "plan": [
        ("misspelt key", ["tokenz=1e12"], "did you mean 'tokens'?"),
        ("negative target", ["target_bpb=-1"], "'target_bpb' = -1.0 is out of range"),
        ("bad preset", ["model.preset=tiyn"], "did you mean 'tiny'?"),
        ("wrong type", ["tokens=lots"], "'tokens' = 'lots' is not float; write a number such as"),
        ("bad suffix", ["tokens=2X"], "'tokens' = '2X' is not float"),
        ("unknown workload", ["workload=train"], "is not 'pretrain' | "),
        ("zero layers", ["model.n_layers=0"], "'model.n_layers' = 0 is out of range"),
    ],
    "diff": [
        ("misspelt key", ["rtoll=1"], "did you mean 'rtol'?"),
        ("no runs", [], "name two runs: kiln diff runs/A runs/B"),
        ("not a run", ["{tmp}", "{tmp}"], "'{tmp}' is not a training run (no config.yaml or provenance.json)"),
    ],
    "label": [
        ("not a sub-command", ["serv", OUT], "'serv' is not a sub-command; write kiln label generate|serve"),
        ("no sub-command", [OUT], "is not a sub-command; write kiln label generate|serve"),
        ("port out of range", ["serve", OUT, "port=70000"], "'label.port' = 70000 is out of range: it must be ≥ 0 and ≤ 65535"),
        ("zero labellers per pair", ["serve", OUT, "labellers_per_pair=0"], "'label.labellers_per_pair' = 0 is out of range"),
        ("negative lease", ["serve", OUT, "lease_s=-1"], "'label.lease_s' = -1.0 is out of range: it must be > 0"),
        ("unknown chat mode", ["generate", OUT, "chat=yes"], "is not 'auto' | 'on' | 'off'"),
        ("misspelt key", ["serve", OUT, "labelers_per_pair=2"], "did you mean 'label.labellers_per_pair'?"),
    ],
}
# Bad for every verb alike (a schema without model.* keys, `kiln diff`'s, has no key to suggest).
for _verb, _spec in cli.VERBS.items():
    _hint = "; did you mean 'model.preset'?" if "model" in {f.name for f in fields(cli._resolve(_spec.schema))} else ""
    BAD.setdefault(_verb, []).extend([
        ("missing recipe", ["-c", "{tmp}/nope.yaml"], "recipe file '{tmp}/nope.yaml' does not exist"),
        ("recipe with a typo", ["-c", "{tmp}/typo.yaml"], f"unknown config key 'modle.preset'{_hint}"),
    ])

CASES = [(verb, name, args, want) for verb, cases in BAD.items() for name, args, want in cases]


def run_kiln(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every case as its own process, four at a time (each is mostly interpreter start-up)."""

    def one(case):
        verb, name, args, _ = case
        tmp = tmp_path_factory.mktemp("case")
        (tmp / "typo.yaml").write_text("modle:\n  preset: tiny\n")
        return (verb, name), (tmp, run_kiln(verb, *(a.replace("{tmp}", str(tmp)) for a in args)))

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, CASES))


def one_error_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_every_verb_has_bad_values_of_its_own():
    for verb in cli.VERBS:
        assert len(BAD[verb]) > 2, f"add {verb}'s bad values to BAD in {__file__}"


@pytest.mark.parametrize(("verb", "name", "args", "want"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_value_gets_one_line_and_exit_code_2(results, verb, name, args, want):
    tmp, p = results[verb, name]
    line = one_error_line(p)
    assert line.startswith(f"kiln {verb}: error: ")
    assert want.replace("{tmp}", str(tmp)) in line
    assert not (tmp / "run").exists()  # nothing written


def test_a_closed_pipe_ends_generate_quietly(run_dir):
    """`kiln generate ... | head`: the reader leaves; kiln stops without BrokenPipeError's traceback."""
    assert kiln("pretrain", f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2") == 0
    p = subprocess.Popen([sys.executable, "-m", "kiln", "generate", f"out={run_dir}", "max_new_tokens=32"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    p.stdout.close()  # before kiln writes anything: its first write finds no reader
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141
    assert err == ""


def distributed_args(tmp_path: Path, prepared: Path) -> list[str]:
    """A layout that needs 3 ranks, on 2: every rank refuses it before building any model."""
    return ["pretrain", f"out={tmp_path / 'run'}", f"data.path={prepared / 'data'}", *TINY_TRAIN,
            "parallel.dp_replicate=3", "parallel.dp_shard=1"]


def test_kiln_launches_processes_itself_and_a_failure_is_one_line(tmp_path, prepared):
    p = run_kiln(*distributed_args(tmp_path, prepared), "--nproc-per-node", "2", timeout=180)
    line = one_error_line(p)
    assert line.startswith("kiln pretrain: error: parallel layout") and "= 3 ranks, but 2 were launched" in line


def test_under_torchrun_only_rank_0_prints_the_error(tmp_path, prepared):
    """`torchrun ... -m kiln`: torchrun still reports the failure its own way, but kiln's line comes once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "kiln",
           *distributed_args(tmp_path, prepared)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("kiln pretrain: error:")]
    assert len(lines) == 1 and "= 3 ranks, but 2 were launched" in lines[0], p.stderr


def _launch_failing_with(monkeypatch, capsys, exits: dict[int, int], timeout_s: float = 120) -> tuple[int, str]:
    """`kiln pretrain --nproc-per-node N` whose workers ended with `exits` (rank -> exit code, as
    torch's agent reports them: -N for signal N), without starting any: the agent's failure is faked."""
    import torch.distributed.launcher.api as launcher
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def fake_launch(config, entrypoint):
        def run(*args):
            failures = {r: ProcessFailure(local_rank=r, pid=1000 + r, exitcode=code, error_file="/nonexistent")
                        for r, code in exits.items()}
            raise ChildFailedError("kiln", failures)
        return run

    monkeypatch.setattr(launcher, "elastic_launch", fake_launch)
    rc = cli.launch("pretrain", len(exits), [], timeout_s)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("abort", [-6, 134], ids=["signal", "through-a-shell"])
def test_a_rank_the_nccl_watchdog_aborted_is_named_with_its_cause(monkeypatch, capsys, abort):
    """Under NCCL a rank whose collective fails or outlasts the timeout is ended by the watchdog with
    SIGABRT (-6 from the agent, 134 through a shell): the one line says so, not just the signal."""
    rc, err = _launch_failing_with(monkeypatch, capsys, {0: -15, 1: abort})
    lines = err.splitlines()
    assert rc == 1 and len(lines) == 1, err
    line = lines[0]
    assert line.startswith("kiln pretrain: error: rank 1 was aborted (SIGABRT")
    assert "NCCL's watchdog" in line and "parallel.timeout_s=120" in line and "resume" in line


def test_a_rank_that_died_is_named_before_the_ranks_the_watchdog_aborted_after_it(monkeypatch, capsys):
    """One rank is killed (out of memory: SIGKILL); the watchdog then aborts the others: the line
    names the killed one, the root cause."""
    rc, err = _launch_failing_with(monkeypatch, capsys, {0: -6, 1: -9, 2: -6})
    assert rc == 1 and err == "kiln pretrain: error: rank 1 was killed by SIGKILL; its output is above"


def test_nccl_runs_raise_collective_errors_instead_of_aborting(monkeypatch):
    """For an NCCL process group kiln asks torch to abort the communicators and raise in the
    training thread (TORCH_NCCL_ASYNC_ERROR_HANDLING=2) rather than SIGABRT the process (its
    default, 3), so a lost peer ends in kiln's one line; a value the user set is kept."""
    import torch

    from kiln.train import parallel

    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    assert parallel.process_group_backend(torch.device("cpu")) == "gloo"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ
    assert parallel.process_group_backend(torch.device("cuda", 0)) == "nccl"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    parallel.process_group_backend(torch.device("cuda", 0))
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


# ---- keys scoped to the verb ---------------------------------------------------------------------------
@pytest.mark.parametrize("verb, key, owner", [
    ("pretrain", "lora.rank=8", "kiln sft"),
    ("pretrain", "sft.data=chats.jsonl", "kiln sft"),
    ("pretrain", "rl.reward=foo:bar", "kiln rl"),
    ("generate", "serve.dtype=bf16", "kiln serve"),
    ("sft", "preference.data=pairs.jsonl", "kiln reward, kiln dpo"),
    ("eval", "train.lr=0.1", "kiln pretrain"),
    ("quantize", "sample.temperature=0", "kiln generate"),
    ("dpo", "classify.input=x.jsonl", "kiln classify"),
])
def test_a_key_the_verb_does_not_read_is_refused_naming_the_verb_that_does(tmp_path, capsys, verb, key, owner):
    out = tmp_path / "run"
    assert kiln(verb, f"out={out}", key) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"config key '{key.split('=')[0]}' is not read by `kiln {verb}`" in err
    assert f"it is read by {owner}" in err
    assert not out.exists()


def test_a_recipe_may_hold_every_verbs_keys(tmp_path, capsys):
    """Recipes are shared by the verbs of a chain (the quickstart recipe holds sft, dpo and rl
    settings): only what is typed on the command line is checked against the verb."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  rank: 8\nsample:\n  temperature: 0\n")
    assert kiln("plan", "model.preset=tiny", "gpus=1") == 0  # a verb with its own schema is not scoped
    assert kiln("eval", "-c", str(recipe), f"out={tmp_path / 'nothing'}") == 2
    assert "is not read by" not in capsys.readouterr().err  # it fails on the missing run, not on the recipe


def test_help_lists_exactly_what_the_verb_reads(capsys):
    """`kiln generate --help` leaves out `report_prompts` (the speedrun's and the labelling app's),
    and the key, bare or whole, is refused as any key the verb does not read."""
    with pytest.raises(SystemExit):
        kiln("generate", "--help")
    shown = capsys.readouterr().out
    assert "prompt " in shown and "report_prompts" not in shown
    for key in ("report_prompts=[a]", "sample.report_prompts=[a]"):
        assert kiln("generate", key) == 2
        assert "config key 'sample.report_prompts' is not read by `kiln generate`; it is read by kiln label" in \
            capsys.readouterr().err


# ---- a path the config names is checked before the verb's module (and torch) is imported ------------
MISSING = "{tmp}/missing"
# (verb, arguments naming a path that does not exist, what the one line says: it names the key)
MISSING_PATHS: list[tuple[str, list[str], str]] = [
    *[(verb, [OUT, f"init_from={MISSING}"], f"init_from={MISSING} is neither a run directory with checkpoints")
      for verb in ("pretrain", "sft", "reward", "dpo", "rl", "vision", "encoder", "classify", "distill")],
    ("distill", [OUT, f"distill.teacher={MISSING}"], f"distill.teacher={MISSING} is neither a run directory"),
    ("rl", [OUT, "init_from={tmp}", f"rl.reward_model={MISSING}"], f"rl.reward_model={MISSING} is neither a run"),
    ("quantize", [OUT, f"source={MISSING}"], f"quantize.source={MISSING} is neither a run directory"),
    ("export", [f"out={MISSING}"], f"out={MISSING} is neither a run directory with checkpoints"),
    ("export", [OUT, f"checkpoint={MISSING}"], f"export.checkpoint={MISSING} is neither a run directory"),
    ("generate", [f"out={MISSING}"], f"out={MISSING} does not exist; name a run, a checkpoint directory"),
    ("serve", [f"out={MISSING}"], f"out={MISSING} does not exist; name a run, a checkpoint directory"),
    ("eval", [f"out={MISSING}"], f"out={MISSING} does not exist; name a run, a checkpoint directory"),
    ("eval", [OUT, f"path={MISSING}"], f"eval.path={MISSING} does not exist; name a run, a checkpoint directory"),
    ("label", ["generate", f"out={MISSING}"], f"out={MISSING} does not exist; name a run, a checkpoint directory"),
    ("label", ["generate", OUT, f"prompts={MISSING}"], f"label.prompts '{MISSING}' does not exist"),
    ("import", [MISSING, OUT], f"hf_import.path={MISSING} is not a directory; point at a Hugging Face model directory"),
    ("sft", [OUT, f"sft.data={MISSING}"], f"sft.data '{MISSING}' does not exist; give a JSONL file"),
    ("sft", [OUT, "sft.data={tmp}/data.jsonl", f"sft.val_data={MISSING}"], f"sft.val_data '{MISSING}' does not exist; give a JSONL file"),
    *[(verb, [OUT, "init_from={tmp}", "preference.data={tmp}/data.jsonl"][:2 + (key == "val_data")]
      + [f"preference.{key}={MISSING}"], f"preference.{key} '{MISSING}' does not exist; give a JSONL file")
      for verb in ("reward", "dpo") for key in ("data", "val_data")],
    ("rl", [OUT, "init_from={tmp}", f"rl.prompts={MISSING}"], f"rl.prompts '{MISSING}' does not exist"),
    ("rl", [OUT, "init_from={tmp}", "rl.prompts={tmp}/data.jsonl", f"rl.val_prompts={MISSING}"], f"rl.val_prompts '{MISSING}' does not exist"),
    ("classify", [OUT, "init_from={tmp}", f"classify.input={MISSING}"], f"classify.input '{MISSING}' is neither a JSONL"),
    *[(verb, [OUT, f"data.path={MISSING}"], f"'{MISSING}' holds no prepared data (manifest.json missing or "
      f"unreadable); run `kiln prepare data.path={MISSING}` first") for verb in ("pretrain", "encoder", "distill")],
    ("vision", [OUT, "data.kind=images", f"data.path={MISSING}"], f"run `kiln prepare data.path={MISSING}` first"),
    ("diff", [MISSING, "{tmp}"], f"'{MISSING}' does not exist; name two training runs: kiln diff runs/A runs/B"),
]
# main() in a fresh interpreter: prints whether torch was imported by the time it returned, exits with its code
PROBE = "import sys\nfrom kiln.cli import main\nrc = main(sys.argv[1:])\nprint('torch' in sys.modules)\nsys.exit(rc)"


@pytest.fixture(scope="module")
def missing_results(tmp_path_factory) -> list:
    def one(case):
        verb, args, want = case
        tmp = tmp_path_factory.mktemp("missing")
        (tmp / "checkpoints").mkdir()  # init_from={tmp}: passes the precheck, so the next path is the one named
        (tmp / "data.jsonl").write_text("")  # a training file beside which a missing held-out file is read
        argv = [verb, *(a.replace("{tmp}", str(tmp)) for a in args)]
        p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return tmp, p

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, MISSING_PATHS))


@pytest.mark.parametrize("i", range(len(MISSING_PATHS)),
                         ids=[f"{v}: {' '.join(a)}" for v, a, _ in MISSING_PATHS])
def test_a_missing_path_is_one_line_before_torch_is_imported(missing_results, i):
    verb, _, want = MISSING_PATHS[i]
    tmp, p = missing_results[i]
    line = one_error_line(p)
    assert line.startswith(f"kiln {verb}: error: ")
    assert want.replace("{tmp}", str(tmp)) in line, line
    assert p.stdout.split() == ["False"], p.stdout  # torch was never imported
    assert not (tmp / "run").exists()  # nothing written


def test_every_verb_input_is_a_key_it_reads_with_a_torch_free_check():
    code = ("import sys\nfrom kiln import cli\n"
            "for v in cli.VERBS.values():\n"
            "    [cli._resolve(i.check) for i in v.inputs]\n"
            "    v.precheck and cli._resolve(v.precheck)\n"
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.stdout.split() == ["False"], p.stderr
    for name, verb in cli.VERBS.items():
        keys = {k for k, _, _ in C.describe(cli._resolve(verb.schema))}
        for inp in verb.inputs:
            for key in inp.keys.split("|") + ([inp.when] if inp.when else []):
                assert key in keys and verb.reads(key), f"kiln {name}: input {key!r}"
            assert set(inp.modes) <= {m for m, _ in verb.modes}


def test_an_existing_path_passes_the_precheck(tmp_path):
    """What the checks let through: the loaders decide the rest (which checkpoint, whether intact)."""
    from kiln.data import inputs
    from kiln.runs import check_checkpoint, check_hf_dir, check_model

    run, step, hf = tmp_path / "run", tmp_path / "step", tmp_path / "hf"
    (run / "checkpoints").mkdir(parents=True)
    step.mkdir()
    (step / "checkpoint.json").write_text("{}")
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for spec in (run, step):
        check_checkpoint(str(spec), "init_from")
        assert check_model(str(spec), "out") == "checkpoint"
    assert check_model(str(hf), "out") == "hf"
    check_hf_dir(str(hf), "hf_import.path")
    for task in inputs.STDLIB_TASKS:
        inputs.check_classify_input(task, "classify.input")
    with pytest.raises(cli.KilnError, match="is not a run \\(checkpoints/\\), a checkpoint"):
        check_model(str(tmp_path), "out")
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(cli.KilnError, match="holds no checkpoint yet"):
        check_model(str(tmp_path), "out")
