"""Sharded checkpoints for runs on many ranks: every rank writes its own shards with
`torch.distributed.checkpoint` (DCP), and any layout (or one plain process) can load them.

A sharded checkpoint is the directory a single-process one is (`checkpoints/step_NNNNNNN/`,
`latest`, `checkpoint.json` written last with every file's size and SHA-256, kept or pruned by
`CheckpointManager`), holding `dcp/` (the shards and DCP's `.metadata`) instead of
`model.safetensors` + `optimizer.pt`. All ranks write into `.step_NNNNNNN.dcp.tmp`; once every
rank is done, rank 0 adds `state.pt`, hashes, writes `checkpoint.json` and renames the directory
into place, so a kill at any moment leaves either a complete checkpoint or a stale temporary.
Rank 0's part (hashing every shard; for the last checkpoint, merging the weights into one file)
can take longer than the collective timeout on a large model, so the other ranks wait for it in a
barrier on the host (gloo) whose timeout is sized from the checkpoint's bytes (`merge_budget_s`).
State dicts go through `get_state_dict` / `set_state_dict` under fully qualified parameter names
(optimizer state flattened), which is what makes a checkpoint independent of the layout: FSDP,
TP, PP stages and DDP all save and load the same keys. The run directory must be on a file system
every rank sees. `consolidate` turns a sharded checkpoint into one `model.safetensors` for export.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from kiln.errors import KilnError
from kiln.runs import publish_dir
from kiln.train.checkpoint import CheckpointManager

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _dcp_load(sd: dict, reader: dcp.FileSystemReader, no_dist: bool) -> None:
    with warnings.catch_warnings():  # reading in one process is intended (resharding to one rank, consolidating)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(sd, storage_reader=reader, no_dist=no_dist)


def is_sharded(path: Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# The slowest rate rank 0 is expected to read, write and hash a checkpoint at (a busy network file
# system): what the others' wait for its part is sized with.
MERGE_BYTES_PER_S = 50e6


def merge_budget_s(tmp: Path, consolidated: bool, timeout_s: float) -> float:
    """How long the other ranks wait for rank 0 to finish a checkpoint in `tmp`: the collective
    timeout plus its part at `MERGE_BYTES_PER_S`: hashing every shard, and for a consolidated one
    also reading them and writing (then hashing) the merged weights: three passes over the bytes."""
    size = sum(f.stat().st_size for f in (Path(tmp) / "dcp").rglob("*") if f.is_file())
    return timeout_s + (3 if consolidated else 1) * size / MERGE_BYTES_PER_S


def _waiting_group(seconds: float):
    """A gloo group over every rank whose operations time out after `seconds`, for a barrier the
    hosts keep (the default group's timeout is the collective one; under NCCL its barrier also
    runs on the GPU, watched by NCCL's watchdog). Collective: every rank makes it together."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))


def _wait_for_rank_0(group) -> None:
    """Every rank waits here, up to the group's timeout, until all (rank 0 last, done with its part)
    arrive; a rank that dies closes its connections, so the others stop at once, not at the limit."""
    try:
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def save(manager: CheckpointManager, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         state: dict, meta: dict, rank: int, consolidated: bool = False, timeout_s: float = 300.0) -> Path:
    """Collective: every rank calls it. With `consolidated`, the checkpoint also carries one
    `model.safetensors` (what generate and export read). `timeout_s`: the collective timeout
    (`parallel.timeout_s`); the wait for rank 0's part is longer (`merge_budget_s`)."""
    final = manager.path(step)
    tmp = manager.dir / f".{final.name}.dcp.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd},
             storage_writer=dcp.FileSystemWriter(tmp / "dcp", sync_files=True))  # collective; .metadata last
    # made now, by every rank together, before rank 0 goes its own way
    waiting = _waiting_group(merge_budget_s(tmp, consolidated, timeout_s)) if dist.is_initialized() else None
    if rank == 0:
        torch.save(state, tmp / "state.pt")
        if consolidated:
            consolidate(tmp, tmp / "model.safetensors", tied=bool(meta.get("model", {}).get("tie_embeddings")))
        world = dist.get_world_size() if dist.is_initialized() else 1
        manager.write_info(tmp, step, {"sharded": True, "world": world, **meta})
        publish_dir(tmp, final)
        manager.mark_latest(final)
    if waiting is not None:
        _wait_for_rank_0(waiting)  # nobody moves on (or reads `latest`) before the checkpoint is in place
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a sharded checkpoint into this rank's part of the model (any layout, or a plain model in
    one process); returns the saved trainer state."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [], options=OPTIONS)
    sd = {"model": model_sd}
    if optimizer is not None:
        sd["optim"] = optim_sd
    try:
        _dcp_load(sd, dcp.FileSystemReader(path / "dcp"), no_dist=not dist.is_initialized())
    except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise KilnError(f"{path} does not fit this model ({first[:300]}); it was saved from a different model: "
                        "use its model settings or a new out=") from None
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=sd["model"],
                   optim_state_dict=sd.get("optim", {}), options=OPTIONS)
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")


def read_tensors(path: Path, tied: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of a sharded checkpoint, gathered in this one process under the single-process
    names (a tied head once, as `tok_emb.weight`). Needs the whole model in CPU memory."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(Path(path) / "dcp")
    meta = reader.read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
          if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    _dcp_load(sd, reader, no_dist=True)  # one process reads every rank's shards
    tensors = {k.removeprefix("model."): v.contiguous() for k, v in sd.items()}
    if tied and "tok_emb.weight" in tensors:
        tensors.pop("lm_head.weight", None)
    return tensors


def consolidate(path: Path, out: Path, tied: bool = True) -> Path:
    """Gather a sharded checkpoint's weights into one safetensors file with the single-process names."""
    out = Path(out)
    tensors = read_tensors(path, tied)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m kiln.train.distributed_checkpoint CHECKPOINT_DIR OUT.safetensors`"""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not is_sharded(Path(argv[0])):
        print("usage: python -m kiln.train.distributed_checkpoint CHECKPOINT_DIR OUT.safetensors "
              "(CHECKPOINT_DIR: a sharded checkpoint, holding dcp/)", file=sys.stderr)
        return 2
    info = CheckpointManager.info(Path(argv[0]))
    consolidate(Path(argv[0]), Path(argv[1]), tied=bool(info.get("model", {}).get("tie_embeddings")))
    print(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
