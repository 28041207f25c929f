"""`kiln <verb>`: one verb per stage, each taking `-c RECIPE.yaml` and `key.sub=value` overrides."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kiln import config as C
from kiln.errors import KilnError

# Set in the processes `--nproc-per-node` starts: they leave their errors to the launcher, which prints one.
LAUNCHED_ENV = "KILN_LAUNCHED"
# Under torchrun, how long a quiet rank waits before exiting with an error, so that rank 0, meeting the
# same error, prints it before torchrun stops every rank as soon as the first one exits.
QUIET_RANK_GRACE_S = 3.0


# What a path setting must name, checked by the same torch-free function the verb's own reader calls
# later (each raises that reader's one-line error): see `Input`.
CHECKPOINT = "kiln.runs:check_checkpoint"  # a run directory with checkpoints/, or a checkpoint directory
MODEL = "kiln.runs:check_model"  # either of those or a Hugging Face directory (what kiln.infer.load reads)
HF_DIR = "kiln.runs:check_hf_dir"  # a Hugging Face model directory to import
PREPARED = "kiln.data.layout:check_prepared"  # prepared data (its manifest.json)
CHATS = "kiln.data.inputs:check_conversations"  # a JSONL file of conversations
PAIRS = "kiln.data.inputs:check_pairs"  # a JSONL file of preference pairs
PROMPTS = "kiln.data.inputs:check_prompts"  # a JSONL file of GRPO prompts
LABEL_PROMPTS = "kiln.data.inputs:check_label_prompts"  # prompts to label, .jsonl or text
CLASSIFY_INPUT = "kiln.data.inputs:check_classify_input"  # a built-in classification task or a JSONL file
RUN = "kiln.provenance:check_run"  # a training run's directory (config.yaml or provenance.json)


@dataclass(frozen=True)
class Input:
    """A path the verb is certain to read when its key is set (an empty key is none: the verb decides
    what that means). `main` checks it once the config is built, before importing the verb's module,
    and with it torch: a missing run or file is named in a fraction of a second, in the same line the
    verb would print on finding it missing later, having loaded nothing and written nothing."""

    keys: str  # the config key; "a|b": the first of these that is set (export.checkpoint, else out)
    check: str  # "module:function" of a torch-free check taking (value, key), raising KilnError
    when: str = ""  # only when this key is set too (a held-out file is read only beside its training file)
    modes: tuple[str, ...] = ()  # only for these sub-commands; empty = all

    def value(self, cfg) -> tuple[str, object] | None:
        """(key, value) to check in `cfg`, or None when there is nothing to check."""
        if self.when and not _get(cfg, self.when):
            return None
        return next(((k, v) for k in self.keys.split("|") if (v := _get(cfg, k))), None)


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclass(frozen=True)
class Verb:
    target: str  # "module:function" taking the built config, imported only when the verb runs
    summary: str
    schema: str = "kiln.config:Config"  # "module:Class" of the config root
    sections: tuple[str, ...] = ()  # which keys `--help` lists (prefixes); empty = all
    shorthand: str | None = None  # section whose keys may be given bare
    flags: tuple[str, ...] = ()  # boolean keys also accepted as --KEY
    # A training verb: continues the run in `out` from its config.yaml, runs under torchrun, and
    # takes --nproc-per-node N to start N processes itself. Its schema has `out` and `resume`.
    trains: bool = False
    # Sub-commands, (name, summary): `kiln VERB MODE key=value ...`; `target` names the function as `{mode}`.
    modes: tuple[tuple[str, str], ...] = ()
    # key a bare first argument sets (`kiln import PATH` = hf_import.path=PATH); a tuple: the keys the
    # bare arguments set in order (`kiln diff A B` = a=A b=B)
    positional: str | tuple[str, ...] | None = None
    ignores: tuple[str, ...] = ()  # keys under `sections` the verb does not read: not in --help, refused
    # Paths the verb reads, in the order it reads them, checked before its module (and torch) is imported.
    inputs: tuple[Input, ...] = ()
    # "module:function" taking (config, sub-command or None): the verb's own torch-free checks that come
    # before it reads `inputs` (serve: listening beyond loopback; label generate: greedy sampling, the database)
    precheck: str | None = None

    def reads(self, key: str) -> bool:
        """Whether the verb reads `key` (a key, or a section holding keys it reads)."""
        if not self.sections:
            return True
        if any(key == s or key.startswith(s + ".") for s in self.ignores):
            return False
        return any(key == s or key.startswith(s + ".") or s.startswith(key + ".") for s in self.sections)


VERBS: dict[str, Verb] = {
    "prepare": Verb(
        "kiln.data.pipeline:run_prepare",
        "read raw text, clean, filter, dedup, train a tokenizer and write token shards",
        sections=("out", "data"),
    ),
    "pretrain": Verb(
        "kiln.workloads.pretrain:run_pretrain",
        "train a language model on prepared token shards (runs unchanged under torchrun; prepares data.input "
        "first if nothing is prepared)",
        sections=("out", "resume", "init_from", "device", "data", "model", "train", "parallel"),
        trains=True,
        inputs=(Input("data.path", PREPARED), Input("init_from", CHECKPOINT)),
    ),
    "sft": Verb(
        "kiln.workloads.sft:run_sft",
        "supervised fine-tuning on conversations, full or LoRA, from a pretrained run (init_from=)",
        sections=("out", "resume", "init_from", "device", "data.tokenizer.path", "sft", "lora", "model", "train",
                  "parallel"),
        trains=True,
        inputs=(Input("init_from", CHECKPOINT), Input("sft.data", CHATS),
                Input("sft.val_data", CHATS, when="sft.data")),
    ),
    "reward": Verb(
        "kiln.workloads.reward:run_reward",
        "train a reward model (backbone + scalar head, Bradley–Terry) on preference pairs, from a run (init_from=)",
        sections=("out", "resume", "init_from", "device", "preference", "model", "train", "parallel"),
        trains=True,
        inputs=(Input("init_from", CHECKPOINT), Input("preference.data", PAIRS),
                Input("preference.val_data", PAIRS, when="preference.data")),
    ),
    "dpo": Verb(
        "kiln.workloads.dpo:run_dpo",
        "direct preference optimization against the frozen init_from model, on preference pairs",
        sections=("out", "resume", "init_from", "device", "preference", "dpo", "model", "train", "parallel"),
        trains=True,
        inputs=(Input("init_from", CHECKPOINT), Input("preference.data", PAIRS),
                Input("preference.val_data", PAIRS, when="preference.data")),
    ),
    "rl": Verb(
        "kiln.workloads.rl:run_rl",
        "GRPO: sample groups of completions, score them (verifiable reward in a sandbox, or a reward model), update",
        sections=("out", "resume", "init_from", "device", "rl", "model", "train", "parallel"),
        trains=True,
        # rl.reward is a module:function name (imported by the reward runner), not a path
        inputs=(Input("init_from", CHECKPOINT), Input("rl.prompts", PROMPTS),
                Input("rl.val_prompts", PROMPTS, when="rl.prompts"), Input("rl.reward_model", CHECKPOINT)),
    ),
    "vision": Verb(
        "kiln.workloads.vision:run_vision",
        "train an image classifier (ViT on the shared Transformer, or a CNN) on prepared image shards",
        sections=("out", "resume", "init_from", "device", "data", "vision", "model", "train", "parallel"),
        trains=True,
        inputs=(Input("data.path", PREPARED), Input("init_from", CHECKPOINT)),
    ),
    "encoder": Verb(
        "kiln.workloads.encoder:run_encoder",
        "pretrain a bidirectional encoder (BERT-class) with masked language modelling on prepared token shards",
        sections=("out", "resume", "init_from", "device", "data.path", "encoder", "model", "train", "parallel"),
        trains=True,
        inputs=(Input("data.path", PREPARED), Input("init_from", CHECKPOINT)),
    ),
    "classify": Verb(
        "kiln.workloads.encoder:run_classify",
        "fine-tune an encoder run (init_from=) with a classification head on labelled text; compare with baselines",
        sections=("out", "resume", "init_from", "device", "classify", "encoder.export", "model", "train", "parallel"),
        trains=True,
        inputs=(Input("init_from", CHECKPOINT), Input("classify.input", CLASSIFY_INPUT)),
    ),
    "distill": Verb(
        "kiln.workloads.distill:run_distill",
        "train a smaller student (model.*) on a frozen teacher run's token distributions (distill.teacher=)",
        sections=("out", "resume", "init_from", "device", "data.path", "distill", "model", "train", "parallel"),
        trains=True,
        inputs=(Input("data.path", PREPARED), Input("init_from", CHECKPOINT), Input("distill.teacher", CHECKPOINT)),
    ),
    "quantize": Verb(
        "kiln.post.quantize:run_quantize",
        "weight-only INT8 / INT4 (round-to-nearest or GPTQ) of a run: kiln quantize source=RUN out=NEW format=int4",
        sections=("out", "device", "data.path", "quantize"),
        shorthand="quantize",
        inputs=(Input("quantize.source", CHECKPOINT),),
    ),
    "generate": Verb(
        "kiln.infer.generate:run_generate",
        "sample from a run's latest checkpoint with the KV cache",
        sections=("out", "device", "sample"),
        shorthand="sample",
        ignores=("sample.report_prompts",),  # the speedrun's and `kiln label`'s prompts
        inputs=(Input("out", MODEL),),
    ),
    "serve": Verb(
        "kiln.serve.api:run_serve",
        "an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) for the run's latest checkpoint",
        sections=("out", "device", "serve"),
        shorthand="serve",
        precheck="kiln.serve:check_exposure",  # before the run: a refused exposure costs nothing
        inputs=(Input("out", MODEL), Input("serve.draft", MODEL)),
    ),
    "speedrun": Verb(
        "kiln.speedrun:run_speedrun",
        "every stage in one command: prepare, pretrain, sample, SFT, DPO, GRPO, eval, serving cost, report",
    ),
    "scale": Verb(
        "kiln.ladder:run_scale",
        "train a ladder of small models (scale.widths × scale.tokens_per_param), fit loss = E + A/N^α + B/D^β, "
        "check the forecast of the largest run held out; scale.json for `kiln plan fit=`",
        sections=("out", "device", "data", "model", "train", "scale"),
        inputs=(Input("data.path", PREPARED),),
    ),
    "label": Verb(
        "kiln.serve.label.cli:run_{mode}",
        "human preference labelling: sample pairs, serve the labelling page, export preference JSONL",
        sections=("out", "device", "label", "sample"),
        ignores=("sample.chat", "sample.system"),  # label.chat decides how prompts are rendered
        shorthand="label",
        modes=(
            ("generate", "sample pairs of completions from the run in out= into the label database"),
            ("serve", "serve the labelling page (127.0.0.1 by default) to invited labellers"),
            ("invite", "add a labeller (name=...) or renew their link, and print the invite link"),
            ("report", "progress, per-labeller counts, agreement (kappa) and position bias"),
            ("export", "write preference JSONL (prompt, chosen, rejected) for kiln reward / kiln dpo"),
        ),
        precheck="kiln.serve.label.cli:check_before_model",
        inputs=(Input("label.prompts", LABEL_PROMPTS, modes=("generate",)), Input("out", MODEL, modes=("generate",))),
    ),
    "export": Verb(
        "kiln.post.export:run_export",
        "write a run's checkpoint as a Hugging Face directory (format=hf: Llama, or the Qwen2 / Qwen3 / Mistral architecture it needs) or a GGUF file (format=gguf)",
        sections=("out", "export"),
        shorthand="export",
        inputs=(Input("export.checkpoint|out", CHECKPOINT),),
    ),
    "import": Verb(
        "kiln.post.export:run_import",
        "turn a Hugging Face Llama, Qwen2, Qwen3 or Mistral directory into a kiln run: kiln import PATH out=runs/NAME",
        sections=("out", "hf_import"),
        shorthand="hf_import",
        positional="hf_import.path",
        inputs=(Input("hf_import.path", HF_DIR),),
    ),
    "eval": Verb(
        "kiln.eval.evaluate:run_eval",
        "bits per byte, code task metrics and samples for a run, checkpoint or export; eval.json and the report",
        sections=("out", "device", "eval"),
        shorthand="eval",
        inputs=(Input("eval.path|out", MODEL),),
    ),
    "diff": Verb(
        "kiln.provenance:run_diff",
        "what differs between two runs: config keys, data, code, packages, hardware, and the step where their "
        "losses part: kiln diff runs/A runs/B",
        schema="kiln.provenance:DiffConfig",
        flags=("json",),
        positional=("a", "b"),
        inputs=(Input("a", RUN), Input("b", RUN)),
    ),
    "plan": Verb(
        "kiln.plan:run_plan",
        "estimate memory, GPUs, days and dollars for a model and token budget",
        schema="kiln.plan:PlanConfig",
        flags=("json",),
    ),
}


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _options_help(verb: Verb) -> str:
    schema = _resolve(verb.schema)
    rows = [r for r in C.describe(schema) if verb.reads(r[0])]
    said = C.notes(schema)
    width = max((len(k) for k, _, _ in rows), default=10)
    lines = ["options (key=value; defaults shown):"]
    for key, typ, default in rows:
        shown = key.split(".", 1)[1] if verb.shorthand and key.startswith(verb.shorthand + ".") else key
        note = f"  {said[key]}" if key in said else ""
        lines.append(f"  {shown:<{width}}  {default!r}  ({typ}){note}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse with kiln's one-line errors (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _process_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process count; write e.g. --nproc-per-node 2")
    return int(text)


def _mode_of(name: str, verb: Verb):
    modes = [m for m, _ in verb.modes]

    def check(text: str) -> str:
        if text not in modes:
            raise argparse.ArgumentTypeError(f"{text!r} is not a sub-command; write kiln {name} {'|'.join(modes)} ...")
        return text

    return check


def make_parser(help_for: str | None = None) -> argparse.ArgumentParser:
    """The parser; `help_for` names the verb whose option table goes into its --help."""
    parser = _Parser(prog="kiln", description="kiln trains AI models end to end.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, verb in VERBS.items():
        p = sub.add_parser(
            name,
            help=verb.summary,
            description=verb.summary + "".join(
                f"\n  kiln {name} {m:<9} {text}" for m, text in verb.modes),
            epilog=_options_help(verb) if name == help_for else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if verb.modes:
            p.add_argument("mode", nargs="?", type=_mode_of(name, verb), metavar="MODE",
                           help="the sub-command: " + ", ".join(m for m, _ in verb.modes))
        p.add_argument("-c", "--config", metavar="RECIPE.yaml", help="YAML recipe (see recipes/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any recipe key")
        for flag in verb.flags:
            p.add_argument(f"--{flag}", action="store_true", help=f"same as {flag}=true")
        if verb.trains:
            p.add_argument("--nproc-per-node", type=_process_count, metavar="N",
                           help="start N processes on this machine (as torchrun --standalone does); "
                                "a failure ends in one line")
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _prints_errors(e: KilnError | None = None) -> bool:
    """Whether this process reports an error itself. Every rank of a distributed run meets the same
    config and data errors, so rank 0 speaks for all; a lost peer is each rank's own news. Under
    `--nproc-per-node` the launcher prints the first failure instead."""
    if os.environ.get(LAUNCHED_ENV):
        return False
    return _rank() == 0 or (e is not None and e.hard_exit)


def _leave_error_for_launcher(message: str) -> None:
    """Write the error where torch's elastic agent looks (TORCHELASTIC_ERROR_FILE, set per worker by
    torchrun and by `--nproc-per-node`), so the launcher names the root cause with kiln's line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
    except OSError:
        pass


def _left_message(failure) -> str | None:
    """The line a failed worker left with `_leave_error_for_launcher`, if any."""
    detail = failure.error_file_data.get("message")
    return detail.get("message") if isinstance(detail, dict) else None


def _quiet_stdout() -> None:
    """The reader of our stdout is gone (`kiln generate | head`): send the rest, and the final flush, nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _aborted(failure) -> bool:
    """Whether a worker died of SIGABRT: -6 as the agent reports a signal, 134 (128 + 6) through a shell."""
    return failure.exitcode in (-signal.SIGABRT, 128 + signal.SIGABRT)


def failure_line(failures: dict, timeout_s: float | None = None) -> tuple[str, int]:
    """The launcher's one line for failed workers (rank -> the agent's `ProcessFailure`) and the
    exit code. The root cause is the first failure, leaving out ranks the agent itself stopped
    (SIGTERM) once another had failed, and ranks aborted with SIGABRT while another failed some
    other way (NCCL's watchdog aborts the survivors of a dead rank); within the same second (the
    timestamps' grain), one that left kiln's line. A rank killed by SIGABRT is named with the
    watchdog's cause, which its output (above) holds in full."""
    causes = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    causes = {r: f for r, f in causes.items() if not _aborted(f)} or causes
    rank = min(causes, key=lambda r: (causes[r].timestamp, _left_message(causes[r]) is None, r))
    failure = causes[rank]
    if _left_message(failure):
        line = _left_message(failure)
    elif _aborted(failure):
        limit = f"parallel.timeout_s={timeout_s:g}" if timeout_s is not None else "parallel.timeout_s"
        line = (f"rank {rank} was aborted (SIGABRT, exit code {failure.exitcode}): that is NCCL's watchdog ending "
                f"a rank whose collective failed or waited longer than {limit}, because another rank died, "
                "stalled or called a different collective; the watchdog's message is in its output above; "
                "rerun the same command to resume from the last checkpoint")
    elif failure.exitcode < 0:
        line = f"rank {rank} was killed by {failure.signal_name()}; its output is above"
    else:
        line = f"rank {rank} exited with code {failure.exitcode}; its output is above"
    return line, 2 if failure.exitcode == 2 else 1


def launch(verb: str, nproc: int, argv: list[str], timeout_s: float | None = None) -> int:
    """`kiln VERB --nproc-per-node N ...`: torchrun's elastic launch (standalone rendezvous) run in this
    process, so that a failed worker ends the launch with its one-line error, not ChildFailedError's dump."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"kiln-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    saved = dict(os.environ)
    os.environ[LAUNCHED_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        elastic_launch(config, sys.executable)("-m", "kiln", verb, *argv)
        return 0
    except ChildFailedError as e:
        line, code = failure_line(e.failures, timeout_s)
        print(f"kiln {verb}: error: {line}", file=sys.stderr)
        return code
    except SignalException:
        print(f"kiln {verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _check_scope(name: str, overrides: list[str], cfg) -> None:
    """A key given on the command line that the verb does not read is an error naming the verbs
    that do (a recipe may hold every verb's keys: only what is typed for this verb is checked)."""
    verb = VERBS[name]
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "." not in key and not hasattr(cfg, key) and verb.shorthand:
            key = f"{verb.shorthand}.{key}"  # a bare key of the verb's own section (`kiln generate prompt=...`)
        if verb.reads(key):
            continue
        owners = [f"kiln {v}" for v, other in VERBS.items() if other.sections and other.reads(key)]
        where = f"; it is read by {', '.join(owners)}: pass it there" if owners else ""
        raise KilnError(f"config key '{key}' is not read by `kiln {name}`{where} (a recipe may hold any verb's "
                        f"keys; `kiln {name} --help` lists the ones it reads)")


def _check_inputs(verb: Verb, cfg, mode: str | None) -> None:
    """The verb's torch-free checks of what its config names (`Verb.precheck`, `Verb.inputs`), before
    its module is imported: a missing run or file is one line at once, not after torch is loaded."""
    if verb.precheck:
        _resolve(verb.precheck)(cfg, mode)
    for item in verb.inputs:
        found = item.value(cfg) if not item.modes or mode in item.modes else None
        if found:
            _resolve(item.check)(found[1], found[0])


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the process ends when this returns
    argv = sys.argv[1:] if argv is None else argv
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = make_parser(help_for=argv[0] if argv and wants_help else None)
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    verb = VERBS[args.verb]
    cfg = None
    try:
        overrides = args.overrides + [f"{f}=true" for f in verb.flags if getattr(args, f)]
        bare = [o for o in overrides if "=" not in o]
        if verb.positional and bare:  # the first bare arguments, in order; any other stays an error
            keys = (verb.positional,) if isinstance(verb.positional, str) else verb.positional
            for key, arg in zip(keys, bare):
                overrides[overrides.index(arg)] = f"{key}={arg}"
        cfg = C.load(_resolve(verb.schema), args.config, overrides, shorthand=verb.shorthand, continue_run=verb.trains,
                     scope=verb.sections)
        _check_scope(args.verb, overrides, cfg)
        _check_inputs(verb, cfg, getattr(args, "mode", None))
        nproc = getattr(args, "nproc_per_node", None)
        if nproc is not None:  # the config is good: start the processes, each loads it again
            timeout_s = getattr(getattr(cfg, "parallel", None), "timeout_s", None)
            return launch(args.verb, nproc, (["-c", args.config] if args.config else []) + overrides, timeout_s)
        saved = C.run_config_path(cfg.out, cfg.resume) if verb.trains else None
        if saved and _rank() == 0:
            print(f"{args.verb}: continuing the run in {cfg.out}: settings read from {saved}, "
                  "then the recipe and overrides")
        target = verb.target
        if verb.modes:
            if args.mode is None:
                raise KilnError(f"say what to do: kiln {args.verb} {'|'.join(m for m, _ in verb.modes)} ...; "
                                f"see `kiln {args.verb} --help`")
            target = target.format(mode=args.mode)
        result = _resolve(target)(cfg)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's final flush
        return result if isinstance(result, int) else 0
    except KilnError as e:
        _leave_error_for_launcher(str(e))
        if _prints_errors(e):
            print(f"kiln {args.verb}: error: {e}", file=sys.stderr)
        elif as_program and not os.environ.get(LAUNCHED_ENV):
            time.sleep(QUIET_RANK_GRACE_S)
        if e.hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except KeyboardInterrupt as e:
        if _prints_errors():
            out = getattr(cfg, "out", None)
            note = resume_note(args.verb, out, getattr(e, "kiln_step", None)) if verb.trains and out else ""
            print(f"kiln {args.verb}: interrupted{note}", file=sys.stderr)
        return 130


def resume_note(verb: str, out: str, step: int | None) -> str:
    """What an interrupted training run left: the checkpoint a rerun continues from and the steps it redoes."""
    from kiln.train.checkpoint import CheckpointManager

    at = f" after step {step}" if step is not None else ""
    ckpt = CheckpointManager(out).latest_intact() if (Path(out) / "checkpoints").is_dir() else None
    if ckpt is None:
        return f"{at}; no checkpoint was saved yet: `kiln {verb} out={out}` starts the run over"
    done = int(CheckpointManager.info(ckpt).get("step", 0))
    lost = ""
    if step is not None and step > done:
        lost = f", redoing step {step}" if step == done + 1 else f", redoing steps {done + 1}-{step}"
    return f"{at}; `kiln {verb} out={out}` continues from the checkpoint of step {done} ({ckpt}){lost}"


if __name__ == "__main__":
    sys.exit(main())
