"""`kiln prepare` end to end: web inputs (WARC + JSONL + Parquet), the stdlib preset, resume after a kill,
strict mode, and the Ray executor producing the same shards as the local one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data_helpers import html_page, prose, write_jsonl, write_parquet, write_warc

from conftest import kiln
from kiln.data.shards import TokenLoader


def web_inputs(d: Path, n: int = 24) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    pages = [(f"http://news{i}.com/a", html_page(prose(i), f"Story {i}")) for i in range(n)]
    pages.append(("http://www.blocked.example/x", html_page(prose(500), "Blocked")))
    pages.append(("http://copy.com/a", pages[0][1]))  # exact duplicate of page 0
    write_warc(d / "crawl.warc.gz", pages, extra=True)
    write_jsonl(d / "docs.jsonl.gz", [{"text": prose(100 + i), "id": f"j{i}"} for i in range(n)]
                + [{"text": "Contact: jane.doe@example.org. " + prose(100)}])  # near duplicate of j0
    write_parquet(d / "table.parquet", [{"text": prose(200 + i)} for i in range(n)] + [{"text": "short"}], 8)
    return d


def shard_bytes(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.suffix in (".bin", ".npy")}


def test_web_recipe_on_warc_jsonl_parquet(tmp_path):
    src = web_inputs(tmp_path / "in")
    out = tmp_path / "run"
    assert kiln("prepare", "-c", "recipes/data-web.yaml", f"out={out}", f"data.input={src}",
                "data.tokenizer.vocab_size=400", "data.executor.workers=1", "data.exclusions=true",
                "data.val_fraction=0.1") == 0
    man = json.loads((out / "data" / "manifest.json").read_text())
    st = man["stages"]
    assert st["read"]["dropped"]["warc_request_record"] == 26 and st["read"]["dropped"]["warc_not_html"] == 1
    assert st["url_blocklist"]["dropped"] == {"blocked_domain": 1}
    assert st["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
    assert st["minhash_dedup"]["dropped"] == {"near_duplicate": 1}
    assert st["length"]["dropped"] == {"too_short": 1}
    kept = man["splits"]["train"]["docs"] + man["splits"]["val"]["docs"]
    assert kept == 72
    excl = [json.loads(line) for line in (out / "data" / "exclusions.jsonl").read_text().splitlines()]
    assert {"id": "http://www.blocked.example/x", "stage": "url_blocklist", "reason": "blocked_domain"} in \
        [{k: e[k] for k in ("id", "stage", "reason")} for e in excl] or any(e["reason"] == "blocked_domain" for e in excl)
    report = (out / "prepare_report.md").read_text()
    assert "| minhash_dedup |" in report and (out / "prepare_lengths.png").stat().st_size > 1000
    assert (out / "prepare_stages.png").is_file() and not (out / "data.work").exists()
    loader = TokenLoader(out / "data", "train", batch_size=2, seq_len=32)
    x, y = loader.next_batch()
    assert x.shape == (2, 32)
    # Rerun with the same inputs: skipped.
    assert kiln("prepare", "-c", "recipes/data-web.yaml", f"out={out}", f"data.input={src}",
                "data.tokenizer.vocab_size=400", "data.executor.workers=1", "data.exclusions=true",
                "data.val_fraction=0.1") == 0
    assert json.loads((out / "data" / "manifest.json").read_text())["created"] == man["created"]


def test_stdlib_preset_keeps_most_python_files(prepared):
    man = json.loads((prepared / "data" / "manifest.json").read_text())
    assert man["stage_order"][:4] == ["read", "clean", "length", "code_quality"]
    read = man["stages"]["read"]["docs_in"]
    kept = man["splits"]["train"]["docs"] + man["splits"]["val"]["docs"]
    assert kept >= 0.85 * read and (prepared / "prepare_report.md").is_file()


def test_strict_mode_stops_at_bad_input(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": prose(i)} for i in range(5)])
    (src / "b.jsonl").write_text('{"text": "ok"}\n{oops\n')
    out = tmp_path / "run"
    args = ["prepare", f"out={out}", f"data.input={src}", "data.tokenizer.vocab_size=300", "data.preset=minimal",
            "data.executor.workers=1"]
    assert kiln(*args, "data.strict=true") == 2
    err = capsys.readouterr().err
    assert "b.jsonl' line 2: not valid JSON" in err and "data.strict" in err and not (out / "data").exists()
    assert kiln(*args) == 0
    assert "b.jsonl' line 2" in capsys.readouterr().err


def _prepare_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from kiln.cli import main; sys.exit(main(sys.argv[1:]))", "prepare",
            f"out={out}", f"data.input={src}", "data.tokenizer.vocab_size=300", "data.preset=web",
            "data.stages=[clean, length, gopher_quality, exact_dedup, minhash_dedup, pii]", *extra]


def test_killed_prepare_resumes_to_identical_output(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(40):
        write_jsonl(src / f"part{k:02d}.jsonl", [{"text": prose(k * 100 + i, 2)} for i in range(12)])
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert subprocess.run(_prepare_cmd(src, ref, "data.executor.workers=1"), capture_output=True).returncode == 0
    proc = subprocess.Popen(_prepare_cmd(src, out, "data.executor.workers=1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    markers = out / "data.work" / "filter"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 5 and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.json")))
    assert 5 <= done < 40 and not (out / "data" / "manifest.json").exists()
    rerun = subprocess.run(_prepare_cmd(src, out, "data.executor.workers=2"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming ({done} tasks already filtered)" in rerun.stdout
    assert shard_bytes(out / "data") == shard_bytes(ref / "data")
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (ref / "tokenizer" / "tokenizer.json").read_bytes()


def test_ray_executor_matches_local(tmp_path):
    pytest.importorskip("ray")
    src = web_inputs(tmp_path / "in", n=12)
    common = ["data.tokenizer.vocab_size=300", "data.preset=web", "data.reader.task_bytes=4000"]
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    assert kiln("prepare", f"out={local}", f"data.input={src}", "data.executor.workers=2", *common) == 0
    assert kiln("prepare", f"out={ray_out}", f"data.input={src}", "data.executor.kind=ray",
                "data.executor.workers=2", *common) == 0
    ml = json.loads((local / "data" / "manifest.json").read_text())
    mr = json.loads((ray_out / "data" / "manifest.json").read_text())
    assert mr["executor"].startswith("ray") and ml["tasks"] == mr["tasks"] > 2
    assert shard_bytes(local / "data") == shard_bytes(ray_out / "data")
    assert ml["splits"] == mr["splits"] and ml["stages"].keys() == mr["stages"].keys()
