"""Scale-out on CPU with gloo: every layout trains to the single-process losses (torchtitan's
loss-parity protocol), sharded checkpoints reshard on resume, and bad layouts, wrong
checkpoints and dead ranks end with one clear line.

Protocol: the same model, seed, data and tokens per step (a single process with batch 8 vs.
2 data-parallel ranks with batch 4, or TP / PP ranks with batch 8), 8 steps. fp32 on CPU:
a layout only changes the order of floating-point sums (sharded and all-reduced), ~1e-7
relative per op, so losses must agree to 5e-6 (absolute, on losses of ~6; observed ≤ 1e-6).

torchrun costs ~8-10 s a launch here, so one launch runs many layouts: this file is also the
driver (`torchrun ... test_distributed.py RUNS.json`), calling `kiln pretrain` once per run
inside one process group.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_TRAIN, check_plan_vs_run, kiln

HERE = Path(__file__).resolve()
STEPS = 8
BASE = [*TINY_TRAIN, f"train.max_steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}",
        "train.ckpt_every=4", "train.lr=1e-2"]
TOL = 5e-6  # ~10 float32 ulps at a loss of 6; observed ≤ 1e-6 (two ulps) on every layout


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def assert_parity(out: Path, ref: Path) -> None:
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    worst = max(abs(got[s] - want[s]) for s in got)
    assert worst < TOL, f"{out.name}: losses differ from a single process by {worst:.2e}\n{got}\n{want}"


def torchrun(nproc: int, runs: list[dict], tmp: Path, timeout: float = 300) -> dict:
    """Run `kiln pretrain` (or `run["verb"]`) for each of `runs` ({"name", "args"}) in one torchrun
    launch of `nproc` ranks."""
    spec = tmp / f"runs-{nproc}.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(HERE), str(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(spec.with_suffix(".out").read_text())


def driver(spec: Path) -> None:
    """Inside torchrun: each run in turn, recording its exit code and error line (rank 0 writes)."""
    from kiln import cli
    from kiln.train import parallel

    parallel.COMPILE_BACKEND = "eager"  # train.compile=on runs: dynamo's tracing and guards, no code generation
    results = {}
    for run in json.loads(spec.read_text()):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as mp:
            if run.get("slow_merge_s"):
                slow_merge(mp, run["slow_merge_s"], run["merge_bytes_per_s"])
            rc = cli.main([run.get("verb", "pretrain"), *run["args"]])
        results[run["name"]] = {"rc": rc, "err": err.getvalue()}
    if int(os.environ["RANK"]) == 0:
        spec.with_suffix(".out").write_text(json.dumps(results))


def slow_merge(mp: pytest.MonkeyPatch, seconds: float, bytes_per_s: float) -> None:
    """Rank 0's part of a sharded save (hashing, merging) takes `seconds` more, on a file system
    every rank takes to move `bytes_per_s` (what the others' wait is sized with)."""
    from kiln.train import distributed_checkpoint as dc

    mp.setattr(dc, "MERGE_BYTES_PER_S", bytes_per_s, raising=False)  # (absent before the wait was sized)
    if int(os.environ["RANK"]) == 0:
        real = dc.CheckpointManager.write_info

        def slow(tmp, step, meta):
            time.sleep(seconds)
            return real(tmp, step, meta)

        mp.setattr(dc.CheckpointManager, "write_info", staticmethod(slow))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- fixtures: a single-process reference, and one 2-rank launch running every 2-rank layout ----
@pytest.fixture(scope="module")
def work(tmp_path_factory, prepared) -> Path:
    return tmp_path_factory.mktemp("dist")


def args(out: Path, prepared: Path, *extra: str) -> list[str]:
    return [f"out={out}", f"data.path={prepared / 'data'}", *BASE, *extra]


@pytest.fixture(scope="module")
def reference(work, prepared) -> Path:
    out = work / "single"
    assert kiln("pretrain", *args(out, prepared, "train.batch_size=8")) == 0
    return out


@pytest.fixture(scope="module")
def reference_accum(work, prepared) -> Path:
    out = work / "single-accum"
    assert kiln("pretrain", *args(out, prepared, "train.batch_size=8", "train.tokens_per_step=1024")) == 0
    return out


LAYOUTS_2 = {
    "ddp": ["parallel.dp_replicate=2", "parallel.dp_shard=1", "train.batch_size=4"],
    "fsdp": ["parallel.dp_shard=2", "train.batch_size=4"],
    "tp": ["parallel.tp=2", "train.batch_size=8"],
    "pp-gpipe": ["parallel.pp=2", "parallel.pp_schedule=gpipe", "train.batch_size=8"],
    "pp-1f1b": ["parallel.pp=2", "parallel.pp_schedule=1f1b", "train.batch_size=8"],
    # accumulation: 2 micro-batches per step (DDP skips the first all-reduce; PP must not rescale twice)
    "ddp-accum": ["parallel.dp_replicate=2", "parallel.dp_shard=1", "train.batch_size=4", "train.tokens_per_step=1024"],
    "pp-accum": ["parallel.pp=2", "train.batch_size=8", "train.tokens_per_step=1024"],
}
BAD_2 = {
    "bad-product": ["parallel.dp_replicate=3", "parallel.dp_shard=1"],
    "bad-tp-heads": ["parallel.tp=2", "model.n_kv_heads=1"],
    "bad-pp-layers": ["parallel.pp=2", "model.n_layers=1"],
    # objectives are honoured under every layout, or refused: never silently replaced
    "bad-pp-docmask": ["parallel.pp=2", "train.document_mask=true"],
}


@pytest.fixture(scope="module")
def two_ranks(work, prepared) -> dict:
    runs = [{"name": n, "args": args(work / n, prepared, *a)} for n, a in LAYOUTS_2.items()]
    runs += [{"name": n, "args": args(work / n, prepared, *a)} for n, a in BAD_2.items()]
    # the FSDP run again, with another model: its checkpoints must be refused
    runs.append({"name": "bad-checkpoint", "args": args(work / "fsdp", prepared, *LAYOUTS_2["fsdp"],
                                                        f"train.max_steps={STEPS + 2}", "model.d_model=128")})
    return torchrun(2, runs, work)


# ---- the alignment verbs under data parallelism -------------------------------------------------
ALIGN_STEPS = 4


@pytest.fixture(scope="module")
def alignment_runs(work, prepared) -> dict[str, Path]:
    """`kiln reward` and `kiln dpo` from one tiny pretrained run on the embedded preference pairs:
    each in a single process (batch 8) and on 2 DDP / 2 FSDP ranks (batch 4 each), in one launch."""
    from test_reward import FAST

    base = work / "align-base"
    base.mkdir()
    for sub in ("data", "tokenizer"):
        shutil.copytree(prepared / sub, base / sub)
    assert kiln("pretrain", f"out={base}", *FAST, "train.max_steps=2") == 0
    common = [f"init_from={base}", *FAST, f"train.max_steps={ALIGN_STEPS}", "train.log_every=1",
              f"train.eval_every={ALIGN_STEPS}", "train.eval_batches=1", "preference.max_pairs=120"]
    layouts = {"single": ["train.batch_size=8"],
               "ddp": ["parallel.dp_replicate=2", "parallel.dp_shard=1", "train.batch_size=4"],
               "fsdp": ["parallel.dp_shard=2", "train.batch_size=4"]}
    for verb in ("reward", "dpo"):
        assert kiln(verb, f"out={work / f'{verb}-single'}", *common, *layouts["single"]) == 0
    runs = [{"name": f"{verb}-{lay}", "verb": verb, "args": [f"out={work / f'{verb}-{lay}'}", *common, *extra]}
            for verb in ("reward", "dpo") for lay, extra in layouts.items() if lay != "single"]
    # GRPO: each rank samples and scores its own prompts; the update is one (ranks' gradients reduced)
    from test_rl import RL_FAST

    prompts = work / "rl-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n", "mode": "ok"}) + "\n" for i in range(12)))
    val = work / "rl-val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"def g{i}(y):\n", "mode": "ok"}) + "\n" for i in range(4)))
    rl = [f"init_from={base}", *RL_FAST, f"train.max_steps={ALIGN_STEPS}", f"train.eval_every={ALIGN_STEPS}",
          f"rl.prompts={prompts}", f"rl.val_prompts={val}", "rl.reward=test_rl:misbehaving_reward", "rl.prompts_per_step=2", "rl.group_size=2",
          "rl.eval_prompts=4", "rl.kl_coef=0.1"]
    runs += [{"name": f"rl-{lay}", "verb": "rl", "args": [f"out={work / f'rl-{lay}'}", *rl, *layouts[lay][:-1]]}
             for lay in ("ddp", "fsdp")]
    # distillation with compiled blocks: a student of another shape beside its teacher, on-policy batches
    runs.append({"name": "distill-fsdp-compile", "verb": "distill", "args": [
        f"out={work / 'distill-fsdp-compile'}", f"data.path={base / 'data'}", f"distill.teacher={base}", *FAST,
        "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "parallel.dp_shard=2", "train.batch_size=2",
        "train.compile=on", "distill.on_policy=0.5", "distill.prompt_len=8", "train.max_steps=3", "train.log_every=1",
        "train.eval_every=3"]})
    res = torchrun(2, runs, work)
    assert all(r["rc"] == 0 for r in res.values()), res
    return {r["name"]: work / r["name"] for r in [*runs, {"name": "reward-single"}, {"name": "dpo-single"}]}


@pytest.mark.parametrize("verb", ["reward", "dpo"])
@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_reward_and_dpo_on_two_ranks_match_a_single_process(alignment_runs, verb, layout):
    """The same 8 pairs a step, split over 2 ranks: the Bradley-Terry and DPO losses of every step
    equal the single process's (each rank's mean over its 4 pairs, averaged over the 2 ranks)."""
    got, want = losses(alignment_runs[f"{verb}-{layout}"]), losses(alignment_runs[f"{verb}-single"])
    assert sorted(got) == list(range(1, ALIGN_STEPS + 1)) and sorted(want) == sorted(got), (got, want)
    worst = max(abs(got[s] - want[s]) for s in got)
    assert worst < TOL, f"{verb} on {layout}: losses differ from a single process by {worst:.2e}\n{got}\n{want}"
    assert len(set(got.values())) > 1  # the loss moves: the steps trained


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_grpo_runs_on_two_ranks(alignment_runs, layout):
    """GRPO under DDP and FSDP2 (rollouts decode through the sharded model: every rank must run as
    many forward passes): every step trains and logs, evaluation runs, the checkpoint holds the
    whole model."""
    from kiln.train.checkpoint import CheckpointManager

    out = alignment_runs[f"rl-{layout}"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward_mean" in m] == list(range(1, ALIGN_STEPS + 1))
    assert [m["step"] for m in metrics if "val_reward" in m] == [0, ALIGN_STEPS]
    assert all(math.isfinite(m["loss"]) and "kl" in m for m in metrics if "reward_mean" in m)
    ck = CheckpointManager(out).latest_intact()
    assert ck is not None and (ck / "model.safetensors").is_file()
    assert "## GRPO" in (out / "report.md").read_text()


def test_distill_with_compiled_blocks_on_two_fsdp_ranks(alignment_runs):
    """Compiled blocks under FSDP2, a teacher and a student of different widths in one process:
    dynamo's shape inference, shared by every model, used to make the teacher's head counts
    symbolic (SDPA then refuses `enable_gqa`); on-policy batches decode through the student."""
    rows = [json.loads(line) for line in (alignment_runs["distill-fsdp-compile"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "val_kd" in r] == [0, 3]


@pytest.mark.parametrize("layout", [n for n in LAYOUTS_2 if "accum" not in n])
def test_two_rank_layouts_match_a_single_process(two_ranks, layout, work, reference):
    assert two_ranks[layout]["rc"] == 0, two_ranks[layout]["err"]
    assert_parity(work / layout, reference)


@pytest.mark.parametrize("layout", ["ddp-accum", "pp-accum"])
def test_gradient_accumulation_under_ddp_and_pp(two_ranks, layout, work, reference_accum):
    assert two_ranks[layout]["rc"] == 0, two_ranks[layout]["err"]
    assert_parity(work / layout, reference_accum)


# Layouts whose per-rank memory the planner predicts within 10% of the allocator's peak; under TP and
# PP it counts Megatron's scheme (vocab-parallel logits, every activation split by tp) and one stage's
# activations in flight, and kiln's runs hold more (docs/planning.md, "Plan vs measured").
PLANNED_WITHIN_10 = ("ddp", "fsdp", "ddp-accum")


def test_every_layout_checks_the_plan_and_data_parallel_memory_lands_within_10_percent(two_ranks, work, reference):
    labels = {"ddp": "2×1×1×1", "fsdp": "1×2×1×1", "tp": "1×1×2×1", "pp-gpipe": "1×1×1×2", "pp-1f1b": "1×1×1×2",
              "ddp-accum": "2×1×1×1", "pp-accum": "1×1×1×2"}
    errors = {}
    for layout in LAYOUTS_2:
        assert two_ranks[layout]["rc"] == 0, two_ranks[layout]["err"]
        data = check_plan_vs_run(work / layout)
        p = data["predicted"]
        assert p["devices"] == 2 and p["layout"] == labels[layout], (layout, p["layout"])
        if layout == "tp":  # on the critical path, at the rate this machine's all-reduce was measured to move
            assert p["exposed_comm_seconds"] > 0
        if layout.startswith("pp"):
            assert p["bubble_seconds"] > 0
        errors[layout] = data["error"]["peak_memory_bytes"]
    assert all(abs(errors[lay]) < 0.10 for lay in PLANNED_WITHIN_10), errors
    assert abs(check_plan_vs_run(reference)["error"]["peak_memory_bytes"]) < 0.10
    # FSDP shards the model states: less memory per rank than a DDP replica, in the plan and in the run
    ddp, fsdp = (json.loads((work / lay / "plan_vs_run.json").read_text()) for lay in ("ddp", "fsdp"))
    for side in ("predicted", "measured"):
        assert fsdp[side]["peak_memory_bytes"] < ddp[side]["peak_memory_bytes"], side


def one_line(result: dict) -> str:
    assert result["rc"] == 2 and "Traceback" not in result["err"], result["err"]
    lines = [ln for ln in result["err"].splitlines() if ln.startswith("kiln pretrain: error:")]
    assert len(lines) == 1, result["err"]
    return lines[0]


def test_bad_layouts_and_checkpoints_get_one_clear_line(two_ranks, work):
    assert "= 3 ranks, but 2 were launched" in one_line(two_ranks["bad-product"])
    assert "parallel.tp=2 does not divide model.n_kv_heads=1" in one_line(two_ranks["bad-tp-heads"])
    assert "parallel.pp=2 pipeline stages but the model has only 1 layers" in one_line(two_ranks["bad-pp-layers"])
    assert "only input_ids pass between stages" in one_line(two_ranks["bad-pp-docmask"])
    assert "holds a run of a different model (d_model: 64 there, 128 here" in one_line(two_ranks["bad-checkpoint"])
    assert (work / "fsdp" / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"  # untouched


# ---- sharded checkpoints --------------------------------------------------------------------------
def truncated_copy(src: Path, dst: Path, keep_step: int) -> Path:
    """`src` as it was at step `keep_step`: later checkpoints and metrics gone."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > keep_step:
            shutil.rmtree(d)
    (dst / "checkpoints" / "latest").write_text(f"step_{keep_step:07d}\n")
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= keep_step))
    return dst


def test_fsdp_checkpoint_is_sharded_and_its_last_one_consolidated(two_ranks, work, reference):
    from kiln.train.checkpoint import CheckpointManager

    ck = work / "fsdp" / "checkpoints" / f"step_{STEPS:07d}"
    info = CheckpointManager.info(ck)
    assert info["sharded"] and info["world"] == 2
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "state.pt", "model.safetensors"} <= set(info["files"])
    assert CheckpointManager(work / "fsdp").verify(ck) is None
    mine = load_file(ck / "model.safetensors")
    ref = load_file(reference / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors")
    assert mine.keys() == ref.keys()
    for k in ref:
        assert (mine[k] - ref[k]).abs().max() < 1e-5, k


def test_the_consolidation_command_gathers_an_intermediate_checkpoint(two_ranks, work, reference):
    """README: `python -m kiln.train.distributed_checkpoint CHECKPOINT OUT.safetensors`."""
    ck = work / "fsdp" / "checkpoints" / "step_0000004"
    assert not (ck / "model.safetensors").exists()
    out = work / "consolidated-4.safetensors"
    p = subprocess.run([sys.executable, "-m", "kiln.train.distributed_checkpoint", str(ck), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    mine = load_file(out)
    ref = load_file(reference / "checkpoints" / "step_0000004" / "model.safetensors")
    assert mine.keys() == ref.keys() and all((mine[k] - ref[k]).abs().max() < 1e-5 for k in ref)
    bad = subprocess.run([sys.executable, "-m", "kiln.train.distributed_checkpoint", str(work)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("usage:")


def test_checkpoint_saved_on_two_ranks_resumes_on_one(two_ranks, work, prepared, reference):
    out = truncated_copy(work / "fsdp", work / "fsdp-to-1", keep_step=4)
    assert kiln("pretrain", *args(out, prepared, "train.batch_size=8")) == 0
    assert_parity(out, reference)


def test_checkpoint_saved_on_two_ranks_resumes_on_two_each_rank_with_its_own_rng(two_ranks, work, prepared, reference):
    out = truncated_copy(work / "fsdp", work / "fsdp-to-2", keep_step=4)
    import torch

    state = torch.load(out / "checkpoints" / "step_0000004" / "state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2  # every rank's RNG states, each restored by its own rank
    res = torchrun(2, [{"name": "resume-fsdp", "args": args(out, prepared, *LAYOUTS_2["fsdp"])}], work)
    assert res["resume-fsdp"]["rc"] == 0, res["resume-fsdp"]["err"]
    assert_parity(out, reference)


def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(two_ranks, work, prepared, reference, capsys):
    out = truncated_copy(work / "fsdp", work / "fsdp-damaged", keep_step=STEPS)
    shard = out / "checkpoints" / f"step_{STEPS:07d}" / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert kiln("pretrain", *args(out, prepared, "train.batch_size=8")) == 0
    assert f"{shard} is truncated" in capsys.readouterr().err
    assert_parity(out, reference)  # steps 5..8 were replayed from step 4


def test_four_ranks_fsdp_x_tp_and_resharding_from_two(two_ranks, work, prepared, reference):
    resumed = truncated_copy(work / "fsdp", work / "fsdp-to-4", keep_step=4)
    runs = [
        {"name": "fsdp-tp", "args": args(work / "fsdp-tp", prepared, "parallel.dp_shard=2", "parallel.tp=2",
                                          "train.batch_size=4")},
        {"name": "resume-fsdp-tp", "args": args(resumed, prepared, "parallel.dp_shard=2", "parallel.tp=2",
                                                "train.batch_size=4")},
    ]
    res = torchrun(4, runs, work)
    for name, out in (("fsdp-tp", work / "fsdp-tp"), ("resume-fsdp-tp", resumed)):
        assert res[name]["rc"] == 0, res[name]["err"]
        assert_parity(out, reference)


# ---- many machines, and machines that die ---------------------------------------------------------
def test_two_nodes_rendezvous_on_localhost(work, prepared, reference):
    """Two torchrun launches, one per "node", meeting through the c10d rendezvous (README's N-node command)."""
    spec = work / "runs-nodes.json"
    spec.write_text(json.dumps([{"name": "nodes", "args": args(work / "nodes", prepared, "parallel.dp_shard=2",
                                                                    "train.batch_size=4")}]))
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=kiln-test", str(HERE), str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outs)
    res = json.loads(spec.with_suffix(".out").read_text())
    assert res["nodes"]["rc"] == 0, res["nodes"]["err"]
    assert_parity(work / "nodes", reference)


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_a_dead_rank_makes_the_others_exit_with_a_clear_line(work, prepared, how):
    """Ranks started by hand (no torchrun agent to tear them down): kill one (its sockets close) or
    stop it (they stay open: only the timeout can tell); the other must exit, not hang."""
    from kiln.train.checkpoint import CheckpointManager

    out, timeout = work / f"dies-{how}", 8
    port = free_port()
    cmd = [sys.executable, "-m", "kiln.cli", "pretrain",
           *args(out, prepared, "parallel.dp_shard=2", "train.max_steps=100000", "train.ckpt_every=1",
                 "train.eval_every=100000", f"parallel.timeout_s={timeout}")]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 4:
            assert time.time() < deadline and procs[0].poll() is None, procs[0].stderr.read() if procs[0].poll() else ""
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=timeout + 60)
        waited = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    assert procs[0].returncode == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("kiln pretrain: error:")]
    assert len(lines) == 1 and "rank 0 of 2 lost contact with the other ranks" in lines[0], err[-3000:]
    assert waited < timeout + 20
    ckpts = CheckpointManager(out)
    assert ckpts.complete() and all(ckpts.verify(c) is None for c in ckpts.complete())  # a kill never leaves half a checkpoint


def test_a_sharded_save_outlasting_the_collective_timeout_on_rank_0_completes(work, prepared):
    """Rank 0 alone hashes every shard and merges the last checkpoint's weights: on a large model
    that outlasts parallel.timeout_s, and a barrier under it failed the other ranks. Here rank 0's
    part takes 8 s more (a slow file system, which the others' wait is sized with) under a 4 s
    timeout: the run ends, its last checkpoint complete and consolidated."""
    from kiln.train.checkpoint import CheckpointManager

    out = work / "slow-merge"
    run = {"name": "slow-merge", "slow_merge_s": 8, "merge_bytes_per_s": 1e5,
           "args": args(out, prepared, "parallel.dp_shard=2", "train.batch_size=4", "train.max_steps=2",
                        "train.ckpt_every=2", "train.eval_every=100", "parallel.timeout_s=4")}
    res = torchrun(2, [run], work, timeout=180)
    assert res["slow-merge"]["rc"] == 0, res["slow-merge"]["err"]
    (final,) = CheckpointManager(out).complete()
    assert CheckpointManager(out).verify(final) is None and (final / "model.safetensors").is_file()
    assert sorted(losses(out)) == [1, 2]


# ---- sharded initialization -----------------------------------------------------------------------
MEM_MODEL = dict(vocab_size=512, d_model=256, n_layers=8, n_heads=4, max_seq_len=64)


def init_peak(out: Path) -> None:
    """Inside torchrun (or alone): the allocator's peak while building and initializing the model
    the way `kiln pretrain` does under FSDP2 (meta → shard → materialize → init), and its weights."""
    from kiln.config import Config, load
    from kiln.model.config import ModelConfig
    from kiln.model.transformer import Transformer
    from kiln.train import parallel
    from kiln.train.metrics import allocation_peak

    cfg = load(Config, None, ["device=cpu"])
    env = parallel.init_env(cfg)
    box = {}
    peak = allocation_peak(lambda: box.update(m=parallel.build_model(
        lambda: Transformer(ModelConfig(**MEM_MODEL)), cfg, env, lambda m: m.init_weights(0))))
    full = {}
    for name, p in box["m"].named_parameters():
        full[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
    if env.rank == 0:
        torch_save = __import__("torch").save
        torch_save({"peak": peak, "weights": full}, out)


def test_sharded_init_holds_half_the_model_per_rank(work):
    """On 2 FSDP2 ranks the model is built on the meta device and only local shards are
    materialized: each rank's peak at init is about half of one process building it whole,
    and the weights are exactly the single-process ones."""
    import torch

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE),
           "--init-peak", str(work / "init-2.pt")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    subprocess.run([sys.executable, str(HERE), "--init-peak", str(work / "init-1.pt")], check=True, timeout=300)
    two, one = torch.load(work / "init-2.pt"), torch.load(work / "init-1.pt")
    model_bytes = sum(t.numel() * 4 for t in one["weights"].values())
    assert one["peak"] >= model_bytes  # one process holds it all
    assert 0.45 < two["peak"] / one["peak"] < 0.6, (two["peak"], one["peak"])
    for k, v in one["weights"].items():
        assert torch.equal(two["weights"][k], v), k


if __name__ == "__main__":
    if sys.argv[1] == "--init-peak":
        init_peak(Path(sys.argv[2]))
    else:
        driver(Path(sys.argv[1]))


def test_generate_reads_a_sharded_checkpoint_without_consolidation(two_ranks, work, reference):
    from kiln.config import SampleConfig
    from kiln.infer.generate import Engine

    out = truncated_copy(work / "fsdp", work / "fsdp-generate", keep_step=4)
    assert not (out / "checkpoints" / "step_0000004" / "model.safetensors").exists()
    sc = SampleConfig(prompt="def ", max_new_tokens=8, temperature=0.0)
    (sharded,) = Engine.from_run(out, "cpu").generate(sc.prompt, sc)
    single = truncated_copy(reference, work / "single-generate", keep_step=4)
    (plain,) = Engine.from_run(single, "cpu").generate(sc.prompt, sc)
    assert sharded == plain
