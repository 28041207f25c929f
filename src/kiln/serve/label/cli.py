"""`kiln label generate | serve | invite | report | export`: the labelling job from the command line.

Whoever can read the database file is its admin: these commands open it directly, while the web
app gives labellers only what their token allows.
"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from kiln.config import Config
from kiln.data.inputs import check_label_prompts
from kiln.errors import KilnError
from kiln.runs import atomic_write_text
from kiln.serve import bind, is_loopback
from kiln.serve.label.app import invite_link
from kiln.serve.label.db import LabelDB, check_name, format_report

MIN_ADMIN_KEY = 16


def db_path(cfg: Config) -> Path:
    return Path(cfg.label.db) if cfg.label.db else Path(cfg.out) / "labels" / "labels.db"


def open_db(cfg: Config) -> LabelDB:
    db = LabelDB(db_path(cfg), cfg.label.busy_timeout_s)
    db.check()
    return db


def base_url(cfg: Config, port: int | None = None) -> str:
    """Where labellers open the page: label.url, else this server's own address."""
    lc = cfg.label
    if lc.url:
        return lc.url.rstrip("/")
    host = f"[{lc.host}]" if ":" in lc.host else lc.host
    return f"http://{host}:{lc.port if port is None else port}"


def read_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file (a "prompt" string per line) or a text file (one per line)."""
    p = check_label_prompts(path)
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise KilnError(f"{path}:{n} is not JSON ({e.msg}); write one {{\"prompt\": \"...\"}} per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise KilnError(f"{path}:{n} has no \"prompt\" string; write one {{\"prompt\": \"...\"}} per line")
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise KilnError(f"prompts file '{path}' holds no prompt; write one prompt a line")
    return prompts


def uses_chat(cfg: Config) -> bool:
    """label.chat, with auto read from the workload that wrote the run's latest checkpoint."""
    if cfg.label.chat != "auto":
        return cfg.label.chat == "on"
    from kiln.data.chat import speaks_chat
    from kiln.train.checkpoint import CheckpointManager

    ckpt = CheckpointManager(Path(cfg.out)).latest_intact()
    return ckpt is not None and speaks_chat(CheckpointManager.info(ckpt))


def check_chat_prompt(fmt, prompt: str, index: int) -> None:
    """A prompt sampled as a user turn (rendered in the run's chat format, `ChatFormat.prompt_ids`: the
    same context `kiln reward` and `kiln dpo` give the exported pairs) must not hold the model's
    special tokens, which would forge turns of their own."""
    found = [t for t in fmt.special_token_texts() if t in prompt]
    if found:
        raise KilnError(f"prompt {index + 1} holds the special token {found[0]}; remove it from label.prompts")


def print_invites(cfg: Config, db: LabelDB, names: list[str], port: int | None = None) -> None:
    for name in names:
        token = db.invite(name)
        print(f"invite {name.strip()}: {invite_link(base_url(cfg, port), token)}")
    if names:
        print("  (each link is shown once and names its labeller: send it to them privately; "
              "`kiln label invite name=...` renews one)")


def check_before_model(cfg: Config, mode: str | None) -> None:
    """What `label generate` refuses before it reads the run (`kiln.cli` calls it before checking the run
    and the prompts file the config names): greedy sampling, and a damaged label database."""
    if mode != "generate":
        return
    if cfg.sample.temperature <= 0:
        raise KilnError("label generate needs two different completions per pair, and sample.temperature=0 "
                        "(greedy) makes them the same; set sample.temperature=0.8")
    if db_path(cfg).exists():  # a damaged database fails now, before the model loads
        open_db(cfg)


def run_generate(cfg: Config) -> int:
    """Sample `pairs_per_prompt` pairs of completions for every prompt into the label database."""
    lc, sc = cfg.label, cfg.sample
    check_before_model(cfg, "generate")
    prompts = read_prompts(lc.prompts) if lc.prompts else list(sc.report_prompts)
    names = [check_name(n) for n in lc.labellers]
    path = db_path(cfg)
    chat = uses_chat(cfg)
    from kiln.infer.generate import Engine

    engine = Engine.from_run(cfg.out, cfg.device)
    if chat:
        engine.chat_format.check_chat(f"label.chat=on: out={cfg.out}")
        for i, p in enumerate(prompts):
            check_chat_prompt(engine.chat_format, p, i)
    db = LabelDB.create(path, lc.busy_timeout_s)
    added = same = empty = 0
    for i, prompt in enumerate(prompts):
        pairs = []
        for k in range(lc.pairs_per_prompt):
            seed = sc.seed + i * lc.pairs_per_prompt + k
            a, b = engine.generate(prompt, replace(sc, num_samples=2, seed=seed, system=""), chat=chat)
            if a == b:
                same += 1
            elif not a.strip() or not b.strip():  # nothing to compare, and no pair kiln dpo would take
                empty += 1
            else:
                pairs.append((prompt, a, b))
        source = json.dumps({"run": str(cfg.out), "chat": chat, "temperature": sc.temperature, "top_k": sc.top_k,
                             "top_p": sc.top_p, "max_new_tokens": sc.max_new_tokens})
        added += db.add_pairs(pairs, source)  # one transaction per prompt: an interruption keeps the rest
        print(f"label generate: prompt {i + 1}/{len(prompts)}: {len(pairs)} pairs", flush=True)
    total, _, _ = db.counts()
    print(f"label generate: {added} new pairs in {path} ({total} in all; "
          f"{'chat: prompts as user turns' if chat else 'plain continuations: label.chat=on for a chat model'})"
          + (f"; {same} samples gave two identical completions and were left out" if same else "")
          + (f"; {empty} samples gave an empty completion and were left out" if empty else ""))
    print_invites(cfg, db, names)
    print(f"next: kiln label serve out={cfg.out}" + (f" label.db={lc.db}" if lc.db else ""))
    return 0


def run_invite(cfg: Config) -> int:
    """Add labeller `label.name` (or renew their link) and print the invite link."""
    if not cfg.label.name.strip():
        raise KilnError("say who to invite: kiln label invite name=alice")
    print_invites(cfg, LabelDB.create(db_path(cfg), cfg.label.busy_timeout_s), [cfg.label.name])
    return 0


def run_report(cfg: Config) -> int:
    print(format_report(open_db(cfg).report(cfg.label.labellers_per_pair)))
    return 0


def run_export(cfg: Config) -> int:
    """Write TRL's preference JSONL ({prompt, chosen, rejected}), whole or not at all."""
    db = open_db(cfg)
    labelled = db.preferences()
    rows = [r for r in labelled if r["chosen"].strip() and r["rejected"].strip()]  # from databases older than that rule
    report = db.report(cfg.label.labellers_per_pair)
    if not rows:
        raise KilnError(f"no pair has a majority preference yet ({report['votes']} votes on {report['pairs']} pairs); "
                        f"label some at `kiln label serve out={cfg.out}` first")
    out = Path(cfg.label.output) if cfg.label.output else db_path(cfg).parent / "preferences.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(format_report(report))
    blank = len(labelled) - len(rows)
    print(f"label export: {len(rows)} preference pairs written to {out} (for kiln reward / kiln dpo)"
          + (f"; {blank} with an empty reply left out (kiln dpo would refuse them)" if blank else ""))
    return 0



def run_serve(cfg: Config) -> int:
    """Serve the labelling page until interrupted (Ctrl-C)."""
    import uvicorn

    from kiln.serve.label.app import make_app

    lc = cfg.label
    loopback = is_loopback(lc.host)
    if not loopback and len(lc.admin_key) < MIN_ADMIN_KEY:
        raise KilnError(f"label.host={lc.host} opens the labelling app beyond this machine; set label.admin_key to a "
                        f"secret of {MIN_ADMIN_KEY}+ characters (the admin token for report and export), "
                        "or keep label.host=127.0.0.1")
    db = open_db(cfg)
    pairs, labellers, votes = db.counts()
    sock = bind(lc.host, lc.port, "label")
    url = base_url(cfg, sock.getsockname()[1])
    admin_key = lc.admin_key or secrets.token_urlsafe(24)
    # On loopback, only the names this machine answers to: a foreign name resolving here (DNS
    # rebinding) is refused.
    allowed = sorted({"127.0.0.1", "localhost", "::1", lc.host, urlsplit(url).hostname or ""}) if loopback else None
    app = make_app(db, admin_key=admin_key, per_pair=lc.labellers_per_pair, lease_s=lc.lease_s, base_url=url,
                   allowed_hosts=allowed)
    print(f"label serve: labelling app at {url}/ ({pairs} pairs, {labellers} labellers, {votes} votes; "
          f"each pair to {lc.labellers_per_pair} labeller(s))", flush=True)
    shown_key = f"#key={admin_key}" if not lc.admin_key else " (key: label.admin_key)"
    print(f"label serve: admin page (report, export, invites) at {url}/admin{shown_key}", flush=True)
    if not labellers:
        print(f"label serve: no labellers yet: kiln label invite out={cfg.out} name=NAME", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    print("label serve: stopped; every acknowledged vote is in " + str(db.path), file=sys.stderr)
    return 0
