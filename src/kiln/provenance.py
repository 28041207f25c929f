"""What made a training run, and what differs between two: `provenance.json` and `kiln diff`.

Every training verb records at its start (the main rank, atomically, beside `config.yaml`) the
code (kiln's git commit, whether the tree was dirty and a hash of its changes; outside a git
checkout, kiln's version), the package versions, the machine, the seeds, the data (the prepared
data's manifest hash, the size and SHA-256 of each input file, the checkpoint each `init_from`
or teacher names), the resolved config's hash and the parallel layout. A resumed run keeps the
sessions before it in `history` and lists in `changed` what differs from the one it continues.

`kiln diff RUN_A RUN_B` compares two runs: config keys, data, code, packages, hardware, layout,
and the first step where their losses part. It reads files only: this module never imports
torch (the training process that writes the record has it loaded, and it is read from there).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.errors import KilnError
from kiln.runs import cpu_model, read_manifest, sha256_file, write_json

FILE = "provenance.json"
FORMAT = 1
GIT_TIMEOUT_S = 10.0
# Distributions whose versions can change a run's numbers (those installed are recorded).
PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "transformers", "triton", "nvidia-cudnn-cu12",
            "nvidia-nccl-cu12")
# What each workload reads besides `init_from`, by config key: `data.path` is prepared data (the
# run's own data/ when empty); the keys in SOURCES name a run or checkpoint; the rest are files.
INPUTS: dict[str, tuple[str, ...]] = {
    "pretrain": ("data.path",),
    "distill": ("data.path", "distill.teacher"),
    "vision": ("data.path",),
    "encoder": ("data.path",),
    "sft": ("sft.data", "sft.val_data"),
    "reward": ("preference.data", "preference.val_data"),
    "dpo": ("preference.data", "preference.val_data"),
    "rl": ("rl.prompts", "rl.val_prompts", "rl.reward_model"),
    "classify": ("classify.input",),
}
SOURCES = ("init_from", "distill.teacher", "rl.reward_model")
# An empty file key reads kiln's built-in default data; these are built into the run directory.
DEFAULT_FILES = {"sft.data": "sft_data/train.jsonl", "sft.val_data": "sft_data/val.jsonl"}
# Compared by `kiln diff` (the other code fields, the checkout's path and its changed files, only inform).
CODE_KEYS = ("source", "kiln_version", "commit", "dirty", "diff_sha256")
SECTIONS = ("code", "packages", "hardware", "parallel")


# ---- what this process runs on -------------------------------------------------------------------
def _git(root: Path, *args: str) -> bytes | None:
    """git's stdout, or None: no git, not a repository, an error, or longer than GIT_TIMEOUT_S."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # read only: never take the index lock
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=GIT_TIMEOUT_S, env=env,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def code_version() -> dict:
    """kiln's version and, when its package directory is tracked in a git checkout, the commit,
    whether the tree differs from it (tracked changes, or untracked files inside the package) and
    a SHA-256 of those changes (`git diff HEAD` plus the untracked files)."""
    rec: dict[str, Any] = {"source": "installed", "kiln_version": __version__}
    pkg = Path(__file__).resolve().parent
    top = _git(pkg, "rev-parse", "--show-toplevel")
    if not top:
        return rec
    root = Path(top.decode(errors="replace").strip())
    rel = os.path.relpath(pkg, root)
    if _git(root, "ls-files", "--error-unmatch", "--", f"{rel}/__init__.py") is None:
        return rec  # a checkout of some other project that happens to hold an installed kiln
    head = _git(root, "rev-parse", "--verify", "-q", "HEAD")
    diff = _git(root, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff") if head else None
    names = _git(root, "diff", "HEAD", "--name-only", "-z") if head else None
    others = _git(root, "ls-files", "--others", "--exclude-standard", "-z", "--", rel)
    if head is None or diff is None or names is None or others is None:
        return {**rec, "source": "git", "root": str(root), "commit": head.decode().strip() if head else None,
                "note": "git did not answer (timed out or failed): changes not recorded"}
    untracked = sorted(f for f in others.decode(errors="replace").split("\0")
                       if f and "__pycache__" not in f and not f.endswith(".pyc"))
    h = hashlib.sha256(diff)
    for f in untracked:
        try:
            h.update(b"\0untracked\0" + f.encode() + b"\0" + (root / f).read_bytes())
        except OSError:
            h.update(b"\0unreadable\0" + f.encode())
    dirty = bool(diff) or bool(untracked)
    changed = sorted({*(n for n in names.decode(errors="replace").split("\0") if n), *untracked})
    return {**rec, "source": "git", "root": str(root), "commit": head.decode().strip(), "dirty": dirty,
            "diff_sha256": h.hexdigest() if dirty else None, "changed_files": changed[:100]}


def package_versions() -> dict:
    """Python's version and each installed distribution of PACKAGES (by its metadata: nothing imported)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def driver_in(text: str) -> str | None:
    """The driver version in /proc/driver/nvidia/version's text (proprietary or open kernel module)."""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d[\d.]*)", text)
    return found.group(1) if found else None


def _nvidia_driver() -> str | None:
    try:
        found = driver_in(Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found
    except OSError:
        pass
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = p.stdout.split()
    return lines[0] if p.returncode == 0 and lines else None


def hardware() -> dict:
    """This machine: host, OS, CPU model and counts, memory; with torch loaded (a training
    process), its CUDA build, CPU threads and the visible GPUs with their driver."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    hw: dict[str, Any] = {"host": platform.node(), "system": f"{platform.system()} {platform.release()}",
                          "machine": platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                          "cpus_usable": usable, "memory_gib": _memory_gib()}
    torch = sys.modules.get("torch")  # never imported here: `kiln diff` stays torch-free
    if torch is not None:
        hw["torch_cuda"] = torch.version.cuda
        hw["cpu_threads"] = torch.get_num_threads()
        hw["gpus"] = []
        if torch.cuda.is_available():
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            props = torch.cuda.get_device_properties(0)
            hw["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            hw["gpu_capability"] = f"{props.major}.{props.minor}"
            hw["gpu_driver"] = _nvidia_driver()
    return hw


# ---- what the run reads -------------------------------------------------------------------------
def _file(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _prepared(value: str, path: Path) -> dict:
    man = read_manifest(path)
    if man is None:
        return {"value": value, "path": str(path), "missing": True}
    splits = {name: {k: s[k] for k in ("docs", "tokens", "images", "bytes") if k in s}
              for name, s in (man.get("splits") or {}).items() if isinstance(s, dict)}
    return {"value": value, "path": str(path), "manifest_sha256": sha256_file(path / "manifest.json"),
            "inputs": man.get("inputs"), "splits": splits, "tokenizer_sha256": man.get("tokenizer_sha256"),
            "prepared": man.get("created")}


def _checkpoint(value: str) -> dict:
    """The checkpoint a run or checkpoint directory holds (a run: its newest complete one)."""
    path = Path(value)
    found = path / "checkpoint.json"
    if not found.is_file():
        steps = sorted((path / "checkpoints").glob("step_*/checkpoint.json"))
        if not steps:
            return {"value": value, "missing": not path.exists()}
        found = steps[-1]
    try:
        step = json.loads(found.read_text()).get("step")
    except (OSError, json.JSONDecodeError, AttributeError):
        step = None
    return {"value": value, "checkpoint": str(found.parent), "step": step, "checkpoint_sha256": sha256_file(found)}


def input_record(key: str, value: str, out: Path) -> dict | None:
    """What the run read at config `key` (None: nothing, e.g. no held-out file)."""
    value = value or ""
    if key == "data.path":
        return _prepared(value, Path(value) if value else out / "data")
    if not value:
        default = out / DEFAULT_FILES[key] if key in DEFAULT_FILES else None
        if default is not None and default.is_file():
            return {"value": "", "default": True, "path": str(default), **_file(default)}
        if key in SOURCES or "val_" in key:
            return None
        return {"value": "", "default": True}  # kiln's built-in data: the code version says which
    if key in SOURCES:
        return _checkpoint(value)
    path = Path(value)
    if path.is_file():
        return {"value": value, **_file(path)}
    if path.is_dir():
        return {"value": value, "directory": True}
    return {"value": value, "builtin": True}  # a name, e.g. a built-in classification task


def _data(out: Path, workload: str, flat: dict) -> dict:
    data = {}
    for key in ("init_from", *INPUTS.get(workload, ())):
        rec = input_record(key, str(flat.get(key) or ""), out)
        if rec is not None:
            data[key] = rec
    tok = out / "tokenizer" / "tokenizer.json"
    if tok.is_file():
        data["tokenizer"] = {"value": "tokenizer/tokenizer.json", **_file(tok)}
    return data


# ---- the record -----------------------------------------------------------------------------------
def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1} (lists, scalars and empty dicts are leaves)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resumed_step(out: Path, resume: str) -> int | None:
    """The step of the checkpoint this session continues: `resume` when it names one, else the
    newest complete checkpoint in the run (None: the run starts at step 0)."""
    found = Path(resume) / "checkpoint.json" if resume not in ("", "auto", "never") else None
    if found is None or not found.is_file():
        done = sorted((out / "checkpoints").glob("step_*/checkpoint.json"))
        if not done:
            return None
        found = done[-1]
    try:
        return int(json.loads(found.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        digits = found.parent.name.removeprefix("step_")
        return int(digits) if digits.isdigit() else None


def collect(out: str | Path, workload: str, config: dict, *, world: int = 1, layout: dict | None = None,
            device: str = "") -> dict:
    """This session's record (see the module's docstring)."""
    out = Path(out)
    flat = flatten(config)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    cfg_file = out / "config.yaml"
    return {
        "format": FORMAT,
        "workload": workload,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["kiln" if Path(sys.argv[0]).name in ("kiln", "__main__.py") else sys.argv[0],
                               *sys.argv[1:]]),
        "cwd": os.getcwd(),
        "code": code_version(),
        "packages": package_versions(),
        "hardware": hardware(),
        "parallel": {"world_size": world, "processes_per_node": local,
                     "nodes": world // local if local and world % local == 0 else None,
                     "layout": dict(layout or {}), "device": device},
        "seeds": {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] == "seed" or k.endswith("_seed")},
        "config": {"file": "config.yaml", "sha256": sha256_file(cfg_file) if cfg_file.is_file() else None},
        "data": _data(out, workload, flat),
        "resumed_at_step": None,
        "changed": [],
        "history": [],
    }


def read_provenance(run: str | Path) -> dict | None:
    p = Path(run) / FILE
    try:
        rec = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def read_config(run: str | Path) -> dict | None:
    """A run's config.yaml, flattened to dotted keys (None: none, or unreadable)."""
    import yaml

    try:
        tree = yaml.safe_load((Path(run) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return flatten(tree) if isinstance(tree, dict) else None


def record_provenance(out: str | Path, workload: str, config: dict, previous_config: dict | None = None, *,
                      world: int = 1, layout: dict | None = None, device: str = "") -> list[dict]:
    """Write `out/provenance.json` for this session and return what changed since the session it
    continues (empty for a new run). A run with a checkpoint is continued: the earlier record moves
    into `history`. `previous_config` is the flattened config.yaml that session ran with (read
    before this session's replaced it). Call it on the main rank only."""
    out = Path(out)
    new = collect(out, workload, config, world=world, layout=layout, device=device)
    step = _resumed_step(out, str(config.get("resume", "auto")))
    if step is not None:
        new["resumed_at_step"] = step
        old = read_provenance(out)
        if old is not None:
            earlier = {k: v for k, v in old.items() if k != "history"}
            new["history"] = [*old.get("history", []), earlier]
            changes = compare_records(earlier, new)
            if previous_config is not None:
                changes["config"] = compare_config(previous_config, flatten(config))
            new["changed"] = [{"section": s, **c} for s, items in changes.items() for c in items]
    write_json(out / FILE, new)
    return new["changed"]


# ---- comparing --------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def compare_config(a: dict, b: dict, skip: set[str] = frozenset()) -> list[dict]:
    """Dotted keys whose values differ (a key only one side has reads as None on the other)."""
    return [{"key": k, "a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b))
            if k not in skip and not _same(a.get(k), b.get(k))]


def _identity(rec: dict | None) -> Any:
    if rec is None:
        return None
    for k in ("sha256", "manifest_sha256", "checkpoint_sha256"):
        if rec.get(k):
            return rec[k]
    return ("default",) if rec.get("default") else ("value", rec.get("value"))


def compare_data(a: dict, b: dict) -> list[dict]:
    """Inputs whose content differs (by hash), or whose setting differs with the same content."""
    out = []
    for key in sorted(set(a) | set(b)):
        ra, rb = a.get(key), b.get(key)
        if _identity(ra) != _identity(rb):
            note = ""
            if ra and rb and ra.get("manifest_sha256") and rb.get("manifest_sha256"):
                parts = [p for p, f in (("inputs", "inputs"), ("tokens", "splits"), ("tokenizer", "tokenizer_sha256"))
                         if ra.get(f) != rb.get(f)]
                note = (f"{' and '.join(parts)} differ" if parts
                        else "same inputs, tokens and tokenizer: manifest.json prepared again or edited")
            out.append({"key": key, "a": ra, "b": rb, **({"note": note} if note else {})})
        elif (ra or {}).get("value") != (rb or {}).get("value"):
            out.append({"key": key, "a": ra, "b": rb, "note": "same content"})
    return out


def compare_records(a: dict, b: dict) -> dict[str, list[dict]]:
    """What differs between two provenance records, by section (data, code, packages, hardware, parallel)."""
    out = {"data": compare_data(a.get("data") or {}, b.get("data") or {})}
    for section in SECTIONS:
        fa, fb = flatten(a.get(section) or {}), flatten(b.get(section) or {})
        if section == "code":
            fa, fb = ({k: f.get(k) for k in CODE_KEYS} for f in (fa, fb))
        out[section] = compare_config(fa, fb)
    return out


def _close(a: float, b: float, rtol: float) -> bool:
    if _same(a, b):
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def read_losses(run: str | Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (a line cut short by a kill is skipped)."""
    out = {}
    try:
        lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float)):
            out[r["step"]] = float(r["loss"])
    return out


def loss_parting(a: dict[int, float], b: dict[int, float], rtol: float = 1e-6) -> dict:
    """Where two runs' losses part: the last common step through which they agree (within `rtol`,
    relative) and the first where they do not."""
    common = sorted(set(a) & set(b))
    res: dict[str, Any] = {"rtol": rtol, "steps_a": [min(a), max(a)] if a else None,
                           "steps_b": [min(b), max(b)] if b else None, "common_steps": len(common),
                           "identical_through": None, "first_difference": None}
    for step in common:
        if not _close(a[step], b[step], rtol):
            res["first_difference"] = {"step": step, "a": a[step], "b": b[step]}
            break
        res["identical_through"] = step
    return res


# ---- kiln diff ----------------------------------------------------------------------------------------
@dataclass
class DiffConfig:
    a: str = ""  # the first run directory (`kiln diff RUN_A RUN_B`: the first bare argument)
    b: str = ""  # the second run directory
    rtol: float = 1e-6  # relative tolerance within which two losses at one step count as the same
    json: bool = False  # print one JSON object instead of text


def check_run(spec: str | Path, key: str = "a") -> Path:
    """`spec` as a path if it is a training run's directory (config.yaml or provenance.json);
    else the one-line error. Torch-free: `kiln.cli` calls it before `kiln diff` runs."""
    path = Path(spec)
    if not path.exists():
        raise KilnError(f"'{spec}' does not exist; name two training runs: kiln diff runs/A runs/B")
    if not path.is_dir() or not ((path / "config.yaml").is_file() or (path / FILE).is_file()):
        raise KilnError(f"'{spec}' is not a training run (no config.yaml or {FILE}); name a directory a training "
                        "verb wrote, e.g. runs/NAME")
    return path


def diff_runs(a: str | Path, b: str | Path, rtol: float = 1e-6) -> dict:
    """What differs between runs `a` and `b` (see `kiln diff`), as a JSON-able dict."""
    a, b = check_run(a, "a"), check_run(b, "b")
    pa, pb = read_provenance(a), read_provenance(b)
    ca, cb = read_config(a), read_config(b)
    notes = [f"{name} ({run}) has no readable {what}" for name, run, rec, what in
             (("A", a, ca, "config.yaml"), ("B", b, cb, "config.yaml"),
              ("A", a, pa, f"{FILE} (trained before kiln recorded one): code, packages, hardware and data "
                           "are not compared"),
              ("B", b, pb, f"{FILE} (trained before kiln recorded one): code, packages, hardware and data "
                           "are not compared"))
             if rec is None]
    inputs = set((pa or {}).get("data") or {}) | set((pb or {}).get("data") or {})
    sections = {"config": compare_config(ca, cb, {"out"} | inputs) if ca is not None and cb is not None else []}
    if pa is not None and pb is not None:
        sections.update(compare_records(pa, pb))
    for name, rec in (("A", pa), ("B", pb)):
        for session in [*(rec or {}).get("history", []), rec] if rec else []:
            moved = [c for c in session.get("changed") or [] if c.get("section") != "config"]
            if moved:
                notes.append(f"{name} was resumed at step {session.get('resumed_at_step')} on changed "
                             + ", ".join(f"{c['section']}.{c['key']}" for c in moved))
    compared = [s for s in sections if s != "config" or (ca is not None and cb is not None)]
    return {"a": str(a), "b": str(b), "workloads": [(pa or {}).get("workload"), (pb or {}).get("workload")],
            **sections, "losses": loss_parting(read_losses(a), read_losses(b), rtol), "notes": notes,
            "same": [s for s in compared if not sections[s]]}


def _short(v: Any) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.9g}"
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32,}", v):
        return v[:12]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return ", ".join(f"{v.count(x)} × {x}" if v.count(x) > 1 else x for x in dict.fromkeys(v))
    if isinstance(v, (list, dict)):
        return json.dumps(v) if v else "(none)"
    return str(v)


def describe_input(rec: dict | None) -> str:
    if rec is None:
        return "(none)"
    where = rec.get("value") or rec.get("path") or ("kiln's built-in default" if rec.get("default") else "")
    if rec.get("missing"):
        return f"{where} (missing)"
    if rec.get("sha256"):
        return f"{where} ({rec['bytes']:,} bytes, sha256 {rec['sha256'][:12]})"
    if rec.get("manifest_sha256"):
        tokens = (rec.get("splits") or {}).get("train", {}).get("tokens")
        extra = f", {tokens:,} train tokens" if isinstance(tokens, int) else ""
        return f"{rec.get('path') or where} (manifest.json sha256 {rec['manifest_sha256'][:12]}{extra})"
    if rec.get("checkpoint_sha256"):
        return f"{where} (step {rec.get('step')}, checkpoint.json sha256 {rec['checkpoint_sha256'][:12]})"
    return where or "(none)"


def _loss_line(loss: dict) -> str:
    sa, sb = loss["steps_a"], loss["steps_b"]
    if not sa or not sb:
        missing = " and ".join(n for n, s in (("A", sa), ("B", sb)) if not s)
        return f"{missing} logged no training loss (metrics.jsonl)"
    if not loss["common_steps"]:
        return f"no common steps (A: steps {sa[0]}-{sa[1]}, B: steps {sb[0]}-{sb[1]})"
    first, through = loss["first_difference"], loss["identical_through"]
    if first is not None:
        where = f"first differ at step {first['step']}: {first['a']:.9g} vs {first['b']:.9g}"
        return where if through is None else f"identical through step {through}; {where}"
    line = f"identical through step {through} ({loss['common_steps']} common steps, relative tolerance {loss['rtol']:g})"
    if sa[1] != sb[1]:
        line += f"; A runs to step {sa[1]}, B to step {sb[1]}"
    return line


def format_diff(d: dict) -> str:
    lines = [f"A: {d['a']}", f"B: {d['b']}"]
    width = 9
    for section in ("config", "data", *SECTIONS):
        for item in d.get(section, []):
            if section == "data":
                text = f"{describe_input(item['a'])} → {describe_input(item['b'])}"
                text += f" ({item['note']})" if item.get("note") else ""
            else:
                text = f"{_short(item['a'])} → {_short(item['b'])}"
            lines.append(f"{section:<{width}} {item['key']}: {text}")
    lines.append(f"{'losses':<{width}} {_loss_line(d['losses'])}")
    if d["same"]:
        lines.append(f"{'same':<{width}} {', '.join(d['same'])}")
    lines += [f"{'note':<{width}} {n}" for n in d["notes"]]
    return "\n".join(lines)


def run_diff(cfg: DiffConfig) -> int:
    """`kiln diff RUN_A RUN_B [--json]`."""
    if not cfg.a or not cfg.b:
        raise KilnError("name two runs: kiln diff runs/A runs/B (or a=runs/A b=runs/B)")
    if not cfg.rtol >= 0:
        raise KilnError(f"rtol={cfg.rtol} must be ≥ 0 (a relative tolerance such as 1e-6)")
    d = diff_runs(cfg.a, cfg.b, cfg.rtol)
    print(json.dumps(d, indent=2, default=str) if cfg.json else format_diff(d))
    return 0
