"""`kiln <verb>`: one verb per stage, each taking `-c RECIPE.yaml` and `key.sub=value` overrides."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from kiln import config as C
from kiln.errors import KilnError


@dataclass(frozen=True)
class Verb:
    target: str  # "module:function" taking the built config, imported only when the verb runs
    summary: str
    schema: str = "kiln.config:Config"  # "module:Class" of the config root
    sections: tuple[str, ...] = ()  # which keys `--help` lists (prefixes); empty = all
    shorthand: str | None = None  # section whose keys may be given bare
    flags: tuple[str, ...] = ()  # boolean keys also accepted as --KEY


VERBS: dict[str, Verb] = {
    "prepare": Verb(
        "kiln.data.pipeline:run_prepare",
        "read raw text, clean, filter, dedup, train a tokenizer and write token shards",
        sections=("out", "data"),
    ),
    "pretrain": Verb(
        "kiln.train.trainer:run_pretrain",
        "train a language model on prepared token shards (runs unchanged under torchrun)",
        sections=("out", "resume", "device", "data.path", "model", "train", "parallel"),
    ),
    "generate": Verb(
        "kiln.serve.engine:run_generate",
        "sample from a run's latest checkpoint with the KV cache",
        sections=("out", "device", "sample"),
        shorthand="sample",
    ),
    "speedrun": Verb(
        "kiln.speedrun:run_speedrun",
        "every stage in one command: prepare, pretrain, sample, report",
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
    rows = [r for r in C.describe(schema) if not verb.sections or any(
        r[0] == s or r[0].startswith(s + ".") for s in verb.sections)]
    width = max((len(k) for k, _, _ in rows), default=10)
    lines = ["options (key=value; defaults shown):"]
    for key, typ, default in rows:
        shown = key.split(".", 1)[1] if verb.shorthand and key.startswith(verb.shorthand + ".") else key
        lines.append(f"  {shown:<{width}}  {default!r}  ({typ})")
    return "\n".join(lines)


def make_parser(help_for: str | None = None) -> argparse.ArgumentParser:
    """The parser; `help_for` names the verb whose option table goes into its --help."""
    parser = argparse.ArgumentParser(prog="kiln", description="kiln trains AI models end to end.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, verb in VERBS.items():
        p = sub.add_parser(
            name,
            help=verb.summary,
            description=verb.summary,
            epilog=_options_help(verb) if name == help_for else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("-c", "--config", metavar="RECIPE.yaml", help="YAML recipe (see recipes/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any recipe key")
        for flag in verb.flags:
            p.add_argument(f"--{flag}", action="store_true", help=f"same as {flag}=true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = make_parser(help_for=argv[0] if argv and wants_help else None)
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    verb = VERBS[args.verb]
    try:
        overrides = args.overrides + [f"{f}=true" for f in verb.flags if getattr(args, f)]
        cfg = C.load(_resolve(verb.schema), args.config, overrides, shorthand=verb.shorthand)
        result = _resolve(verb.target)(cfg)
        return result if isinstance(result, int) else 0
    except KilnError as e:
        print(f"kiln {args.verb}: error: {e}", file=sys.stderr)
        if e.hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print(f"kiln {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
