"""The decisions kiln makes for a CUDA device, tested without one: which GPU each rank takes,
TF32 for fp32 matmuls, each rank's own RNG state across a resume (on fewer visible GPUs too),
the peak memory counted per `Trainer.fit`, and the MFU peak of the precision trained in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY_TRAIN
from kiln.config import Config, load
from kiln.data.shards import TokenLoader
from kiln.errors import KilnError
from kiln.model.transformer import Transformer
from kiln.train import parallel
from kiln.train import trainer as trainer_module
from kiln.train.objectives import LanguageModeling
from kiln.train.trainer import Trainer
from kiln.workloads.common import model_config_for


def _gpus(monkeypatch, count: int, local_rank: int | None = None, local_world: int | None = None,
          world: int | None = None) -> None:
    """This process as torchrun starts it on a node with `count` visible GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for name, value in (("LOCAL_RANK", local_rank), ("LOCAL_WORLD_SIZE", local_world), ("WORLD_SIZE", world)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))


# ---- which GPU: `cuda` is this rank's local GPU ----------------------------------------------
def test_cuda_means_this_ranks_local_gpu(monkeypatch):
    _gpus(monkeypatch, 4, local_rank=2, local_world=4, world=8)
    assert parallel.choose_device("cuda") == torch.device("cuda", 2)
    assert parallel.choose_device("auto") == torch.device("cuda", 2)
    _gpus(monkeypatch, 2)  # one process, no torchrun
    assert parallel.choose_device("cuda") == torch.device("cuda", 0)
    assert parallel.choose_device("cuda:1") == torch.device("cuda", 1)


def test_a_fixed_gpu_is_refused_with_several_ranks_per_node(monkeypatch):
    _gpus(monkeypatch, 4, local_rank=1, local_world=4, world=4)
    with pytest.raises(KilnError, match=r"device=cuda:0 .* 4 ranks on this node .* device=cuda"):
        parallel.choose_device("cuda:0")
    _gpus(monkeypatch, 4, local_rank=0, local_world=1, world=2)  # one rank per node: every node's GPU 3
    assert parallel.choose_device("cuda:3") == torch.device("cuda", 3)


def test_more_ranks_or_a_higher_index_than_visible_gpus_is_one_line(monkeypatch):
    _gpus(monkeypatch, 2, local_rank=3, local_world=4, world=4)
    for spec in ("cuda", "auto"):
        with pytest.raises(KilnError, match=r"LOCAL_RANK=3, but 2 GPUs are visible on this node"):
            parallel.choose_device(spec)
    _gpus(monkeypatch, 2)
    with pytest.raises(KilnError, match=r"device=cuda:2 .* 2 GPUs"):
        parallel.choose_device("cuda:2")


def test_a_cuda_device_is_made_current_with_tf32_on(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        parallel.use_device(torch.device("cpu"))
        assert not current and not torch.backends.cuda.matmul.allow_tf32
        assert parallel.use_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
        assert current == [torch.device("cuda", 1)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---- a trainer whose device is a (fake) GPU --------------------------------------------------
def _trainer(run_dir, overrides=()):
    cfg = load(Config, None, [f"out={run_dir}", *TINY_TRAIN, "train.max_steps=2", *overrides])
    env = parallel.init_env(cfg)
    torch.manual_seed(0)
    model = parallel.build_model(lambda: Transformer(model_config_for(cfg, 512)), cfg, env, lambda m: m.init_weights(0))
    loader = TokenLoader(run_dir / "data", "train", cfg.train.batch_size, cfg.train.seq_len, 0)
    return Trainer(cfg, model, env, loader, LanguageModeling())


class FakeCudaRng:
    """One RNG state per visible GPU, read and written as torch.cuda's functions do (the real
    `set_rng_state_all` raises IndexError for more states than visible GPUs)."""

    def __init__(self, monkeypatch, visible: int, tag: int = 0) -> None:
        self.states = {i: torch.full((8,), 10 * tag + i, dtype=torch.uint8) for i in range(visible)}
        self.visible = visible
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(visible)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    @staticmethod
    def _index(device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return 0 if device.index is None else device.index

    def get(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set(self, state, device="cuda"):
        i = self._index(device)
        if i >= self.visible:
            raise RuntimeError(f"invalid device ordinal {i}")
        self.states[i] = state.clone()

    def set_all(self, states):
        for i, s in enumerate(states):
            if i >= self.visible:
                raise IndexError("list index out of range")
            self.states[i] = s.clone()


def test_resume_on_fewer_visible_gpus_restores_this_devices_rng(run_dir, monkeypatch):
    tr = _trainer(run_dir)
    saving = FakeCudaRng(monkeypatch, visible=2, tag=1)
    tr.env = dataclasses.replace(tr.env, device=torch.device("cuda", 0))
    path = tr.ckpt.save(1, tr.model, tr.optimizer, tr.state(), tr.meta)
    saved = torch.load(path / "state.pt", weights_only=True)
    assert "rng_cuda" not in saved and torch.equal(saved["rng_device"], saving.states[0])  # this device's only
    resuming = FakeCudaRng(monkeypatch, visible=1, tag=9)
    tr.resume_from(path)  # one GPU visible now: no IndexError
    assert torch.equal(resuming.states[0], saving.states[0])


def test_a_checkpoint_with_every_visible_gpus_rng_still_resumes(run_dir, monkeypatch):
    """Checkpoints written before: `rng_cuda` holds one state per GPU the saving process saw."""
    tr = _trainer(run_dir)
    tr.env = dataclasses.replace(tr.env, device=torch.device("cuda", 1))
    fake = FakeCudaRng(monkeypatch, visible=2, tag=3)
    state = {k: v for k, v in tr.state().items() if not k.startswith("rng_") or k == "rng_cpu"}
    old = [torch.full((8,), 70 + i, dtype=torch.uint8) for i in range(3)]
    path = tr.ckpt.save(1, tr.model, tr.optimizer, {**state, "rng_cuda": old}, tr.meta)
    tr.resume_from(path)
    assert torch.equal(fake.states[1], old[1]) and torch.equal(fake.states[0], torch.full((8,), 30, dtype=torch.uint8))
    tr.env = dataclasses.replace(tr.env, device=torch.device("cuda", 0))
    short = tr.ckpt.save(2, tr.model, tr.optimizer, {**state, "rng_cuda": []}, tr.meta)
    tr.resume_from(short)  # no entry for this device: left as seeded
    assert torch.equal(fake.states[0], torch.full((8,), 30, dtype=torch.uint8))


def test_each_rank_saves_and_restores_its_own_rng(run_dir, monkeypatch):
    tr = _trainer(run_dir)
    FakeCudaRng(monkeypatch, visible=2, tag=1)
    mine = {}

    def gather(out, obj):  # two ranks: rank 0's states are its own, rank 1's are this process's
        mine.update(obj)
        out[:] = [{k: (v + 100 if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 else v)
                   for k, v in obj.items()}, obj]

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    tr.env = dataclasses.replace(tr.env, device=torch.device("cuda", 1), rank=1, world=2)
    state = tr.state()
    assert len(state["rng_ranks"]) == 2 and torch.equal(state["rng_ranks"][1]["rng_device"], mine["rng_device"])
    cpu_before = torch.get_rng_state()
    torch.rand(3)
    resuming = FakeCudaRng(monkeypatch, visible=2, tag=5)
    trainer_module.restore_rng(state, tr.env)
    assert torch.equal(resuming.states[1], mine["rng_device"])  # rank 1's own, not rank 0's
    assert torch.equal(resuming.states[0], torch.full((8,), 50, dtype=torch.uint8))
    assert torch.equal(torch.get_rng_state(), cpu_before)


# ---- what a fit counts on a GPU --------------------------------------------------------------
class _Stop(Exception):
    pass


@pytest.mark.parametrize("precision,peak_precision", [("auto", "bf16"), ("bf16", "bf16"), ("fp32", "fp32")])
def test_each_fit_counts_its_own_peak_memory_and_the_peak_of_its_precision(run_dir, monkeypatch, precision,
                                                                            peak_precision):
    tr = _trainer(run_dir, [f"train.precision={precision}"])
    tr.env = dataclasses.replace(tr.env, device=torch.device("cuda", 0))
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))

    def peak(device, shapes=(), precision="bf16"):
        calls.append(("peak", precision))
        raise _Stop

    monkeypatch.setattr(trainer_module, "peak_flops", peak)
    with pytest.raises(_Stop):
        tr.fit()
    assert calls == [("reset", torch.device("cuda", 0)), ("peak", peak_precision)]
