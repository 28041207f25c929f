"""`kiln prepare` end to end: web inputs (WARC + JSONL + Parquet), the stdlib preset, resume after a kill,
strict mode, the Ray executor producing the same shards as the local one, and what a user reads
afterwards (exclusions, per-document metadata, the report), also when the run stops early."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_data_helpers import html_page, prose, write_jsonl, write_parquet, write_warc

from conftest import kiln
from kiln.data.layout import tokenizer_path
from kiln.data.shards import TokenLoader

# Divs nested this deep and never closed: resiliparse's C extractor needs minutes on such a page.
HOSTILE_PAGE = "<html><body>" + "<div>" * 40000 + "never closed"


def web_inputs(d: Path, n: int = 24, hostile: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    pages = [(f"http://news{i}.com/a", html_page(prose(i), f"Story {i}")) for i in range(n)]
    pages.append(("http://www.blocked.example/x", html_page(prose(500), "Blocked")))
    pages.append(("http://copy.com/a", pages[0][1]))  # exact duplicate of page 0
    if hostile:
        pages.append(("http://deep.example/nested", HOSTILE_PAGE))
    write_warc(d / "crawl.warc.gz", pages, extra=True)
    write_jsonl(d / "docs.jsonl.gz", [{"text": prose(100 + i), "id": f"j{i}"} for i in range(n)]
                + [{"text": "Contact: jane.doe@example.org. " + prose(100)}])  # near duplicate of j0
    write_parquet(d / "table.parquet", [{"text": prose(200 + i)} for i in range(n)] + [{"text": "short"}], 8)
    return d


def shard_bytes(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.suffix in (".bin", ".npy")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_web_recipe_on_warc_jsonl_parquet(tmp_path):
    src = web_inputs(tmp_path / "in", hostile=True)
    out = tmp_path / "run"
    args = ["prepare", "-c", "recipes/data-web.yaml", f"out={out}", f"data.input={src}", "data.tokenizer.vocab_size=400",
            "data.executor.workers=1", "data.exclusions=true", "data.val_fraction=0.1",
            "data.reader.extract_timeout_s=1"]
    t0 = time.perf_counter()
    assert kiln(*args) == 0
    assert time.perf_counter() - t0 < 60  # the hostile page alone would take minutes without the kill
    man = json.loads((out / "data" / "manifest.json").read_text())
    st = man["stages"]
    assert st["read"]["dropped"]["warc_request_record"] == 27 and st["read"]["dropped"]["warc_not_html"] == 1
    assert st["extract"]["dropped"] == {"extract_timeout": 1}
    assert st["url_blocklist"]["dropped"] == {"blocked_domain": 1}
    assert st["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
    assert st["minhash_dedup"]["dropped"] == {"near_duplicate": 1}
    assert st["length"]["dropped"] == {"too_short": 1}
    kept = man["splits"]["train"]["docs"] + man["splits"]["val"]["docs"]
    assert kept == 72
    excl = read_jsonl(out / "data" / "exclusions.jsonl")
    by_url = {e["url"]: e for e in excl if "url" in e}
    crawl = str(src / "crawl.warc.gz")
    # A WARC document is named by its record id; its URL and source file come with it.
    blocked = by_url["http://www.blocked.example/x"]
    assert (blocked["stage"], blocked["reason"], blocked["path"]) == ("url_blocklist", "blocked_domain", crawl)
    assert blocked["id"].startswith("<urn:uuid:")
    assert (by_url["http://deep.example/nested"]["stage"], by_url["http://deep.example/nested"]["reason"]) == \
        ("extract", "extract_timeout")
    copy = by_url["http://copy.com/a"]
    assert (copy["stage"], copy["reason"], copy["path"]) == ("exact_dedup", "exact_duplicate", crawl)
    near = [e for e in excl if e["reason"] == "near_duplicate"]
    assert [(e["stage"], e["path"]) for e in near] == [("minhash_dedup", str(src / "docs.jsonl.gz"))]
    # One vocabulary: exclusions count exactly what the manifest (and the report) count, by the same names.
    counted = Counter()
    for e in excl:
        counted[e["stage"], e["reason"]] += e.get("docs", 1)
    assert counted == Counter({(name, r): n for name, s in st.items() for r, n in s["dropped"].items()})
    report = (out / "prepare_report.md").read_text()
    assert "| minhash_dedup |" in report and "exact_duplicate: 1" in report
    assert (out / "prepare_lengths.png").stat().st_size > 1000
    assert (out / "prepare_stages.png").is_file() and not (out / "data.work").exists()
    loader = TokenLoader(out / "data", "train", batch_size=2, seq_len=32)
    assert loader.next_batch()["input_ids"].shape == (2, 32)
    # Rerun with the same inputs: skipped.
    assert kiln(*args) == 0
    assert json.loads((out / "data" / "manifest.json").read_text())["created"] == man["created"]


def score_chars(text: str) -> float:  # the classifier hook below: a score a test can predict
    return len(text) / 1000


def test_classifier_decontaminate_language_and_max_docs_in_a_real_prepare(tmp_path):
    src, evals = tmp_path / "in", tmp_path / "eval.jsonl"
    src.mkdir()
    secret = prose(99, 1).strip()
    write_jsonl(evals, [{"text": secret}])
    german = "Der schnelle braune Fuchs springt über den faulen Hund und die Katze schläft im Garten. " * 5
    recs = [{"id": "e0", "text": prose(0) + "Write to jane.doe@example.org for a copy.\n"},
            {"id": "short", "text": "Home improvement ideas for a modern kitchen."},  # detect_fast says 'de'
            {"id": "german", "text": german},
            {"id": "tiny", "text": "Tiny note."},
            {"id": "leak", "text": prose(1) + secret},
            *[{"id": f"e{i}", "text": prose(i)} for i in range(2, 10)]]
    write_jsonl(src / "docs.jsonl", recs)
    out = tmp_path / "run"
    stages = ("[clean, length, language, {classifier: {function: 'test_data_pipeline:score_chars', min_score: 0.03}}, "
              f"{{decontaminate: {{path: '{evals}'}}}}, exact_dedup, pii]")
    assert kiln("prepare", f"out={out}", f"data.input={src}", f"data.stages={stages}", "data.min_chars=5",
                "data.max_docs=5", "data.exclusions=true", "data.tokenizer.vocab_size=300",
                "data.executor.workers=1") == 0
    man = json.loads((out / "data" / "manifest.json").read_text())
    st = man["stages"]
    assert st["language"]["dropped"] == {"language_de": 1}
    assert st["classifier"]["dropped"] == {"classifier_low": 1}
    assert st["decontaminate"]["dropped"] == {"contaminated": 1}
    assert st["max_docs"]["dropped"] == {"max_docs": 5}
    assert man["splits"]["train"]["docs"] + man["splits"]["val"]["docs"] == 5
    excl = {e["id"]: e for e in read_jsonl(out / "data" / "exclusions.jsonl")}
    assert excl["german"]["language"] == "de" and isinstance(excl["german"]["language_score"], int)
    assert excl["tiny"]["reason"] == "classifier_low" and excl["tiny"]["score"] == pytest.approx(0.011)
    assert excl["leak"]["reason"] == "contaminated"
    assert [i for i, e in excl.items() if e["reason"] == "max_docs"] == [f"e{i}" for i in range(5, 10)]
    # What the stages measured about the kept documents outlives the work directory.
    meta = read_jsonl(out / "data" / "metadata.jsonl")
    assert [m["id"] for m in meta] == ["e0", "short", "e2", "e3", "e4"]  # max_docs keeps the first, in order
    by_id = {m["id"]: m for m in meta}
    assert by_id["e0"]["pii_emails"] == 1 and by_id["e0"]["language"] == "en"
    assert by_id["e0"]["score"] == pytest.approx(len(recs[0]["text"]) / 1000, abs=0.002)
    assert "language" not in by_id["short"]  # too short to judge: kept, not called German
    assert {m["split"] for m in meta} == {"train", "val"}
    assert "metadata.jsonl" in (out / "prepare_report.md").read_text()


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


def require_ray():
    """Ray, or a skip where kiln[data] is not installed at all. `make test` installs kiln[data], so
    when its other packages are present a Ray that does not import fails the test instead."""
    try:
        import ray
    except ImportError:
        if any(importlib.util.find_spec(m) for m in ("trafilatura", "datatrove")):
            raise
        pytest.skip("Ray is not installed: pip install 'kiln[data]'")
    return ray


def test_ray_executor_matches_local(tmp_path):
    require_ray()
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


def small_corpus(d: Path, n: int = 6) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "docs.jsonl", [{"text": prose(i)} for i in range(n)])
    return d


def test_prepare_does_not_replace_a_trained_runs_tokenizer(tmp_path, capsys):
    src, out = small_corpus(tmp_path / "in"), tmp_path / "run"
    args = ["prepare", f"out={out}", f"data.input={src}", "data.preset=minimal", "data.executor.workers=1"]
    assert kiln(*args, "data.tokenizer.vocab_size=300") == 0
    assert kiln(*args, "data.tokenizer.vocab_size=290") == 0  # a data-only run: preparing again is allowed
    ckpt = out / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text("{}")
    tokenizer = (out / "tokenizer" / "tokenizer.json").read_bytes()
    data = (out / "data" / "manifest.json").read_bytes()
    capsys.readouterr()
    for extra in ([], [f"data.path={out / 'data'}"]):
        assert kiln(*args, "data.tokenizer.vocab_size=300", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "step_0000010" in err[0] and "new out=" in err[0] and "data.path=" in err[0], err
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    assert (out / "data" / "manifest.json").read_bytes() == data
    assert kiln(*args, "data.tokenizer.vocab_size=290") == 0  # nothing to redo: skipped, not refused
    assert "up to date" in capsys.readouterr().out
    # The fix the message names: the data (and its own tokenizer) elsewhere; the run's tokenizer stays.
    other = tmp_path / "other"
    assert kiln(*args, "data.tokenizer.vocab_size=300", f"data.path={other}") == 0
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer
    man = json.loads((other / "manifest.json").read_text())
    assert tokenizer_path(other, man) == (other / "tokenizer.json").resolve() and man["vocab_size"] <= 300


def test_a_run_that_stops_early_still_writes_its_report(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_jsonl(src / "docs.jsonl", [{"text": prose(1)}, {"text": "too short to keep"}, {"text": prose(1)}])
    out = tmp_path / "run"
    assert kiln("prepare", f"out={out}", f"data.input={src}", "data.preset=minimal", "data.executor.workers=1",
                "data.tokenizer.vocab_size=300") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "single document" in err[0] and str(out / "prepare_report.md") in err[0]
    report = (out / "prepare_report.md").read_text()
    assert "stopped" in report and "single document" in report
    assert "too_short: 1" in report and "exact_duplicate: 1" in report  # which stage removed what
    assert not (out / "data").exists() and not (out / "tokenizer").exists()
    write_jsonl(src / "docs.jsonl", [{"text": "short"}])
    assert kiln("prepare", f"out={out}", f"data.input={src}", "data.preset=minimal", "data.executor.workers=1") == 2
    assert "no documents left" in capsys.readouterr().err
    assert "too_short: 1" in (out / "prepare_report.md").read_text()


def test_a_smaller_vocabulary_than_asked_is_reported(tmp_path, capsys):
    src, out = small_corpus(tmp_path / "in", 3), tmp_path / "run"
    assert kiln("prepare", f"out={out}", f"data.input={src}", "data.preset=minimal", "data.executor.workers=1",
                "data.tokenizer.vocab_size=5000") == 0
    man = json.loads((out / "data" / "manifest.json").read_text())
    assert man["vocab_size_requested"] == 5000 and man["vocab_size"] < 5000
    note = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert note == [f"prepare: note: the tokenizer has {man['vocab_size']} tokens, not the 5000 of "
                    "data.tokenizer.vocab_size: the corpus has no more pairs to merge; models take the smaller "
                    "vocabulary (give more text for more)"]
    assert f"vocab {man['vocab_size']} (uint16), not the 5000 asked for" in (out / "prepare_report.md").read_text()


def test_ctrl_c_prints_one_line(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(60):
        write_jsonl(src / f"part{k:02d}.jsonl", [{"text": prose(k * 100 + i, 2)} for i in range(12)])
    out = tmp_path / "run"
    # Its own process group, so the SIGINT reaches the driver and its worker processes, as Ctrl-C in a terminal does.
    # SIGINT at its default in the child: under `nohup` or a shell's `&` it is inherited ignored, and
    # Python then never raises KeyboardInterrupt (the test ran so once and saw prepare finish with 0)
    proc = subprocess.Popen(_prepare_cmd(src, out, "data.executor.workers=2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    markers = out / "data.work" / "filter"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "prepare ended before it could be interrupted; give it more files"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "kiln prepare: interrupted\n", stderr
    assert stdout.startswith("prepare: 60 files in ")  # messages name the verb
    assert all(line.startswith("prepare: ") for line in stdout.splitlines()), stdout


def test_the_closing_lines_name_the_largest_drops_and_warn_when_a_stage_removes_most(tmp_path, capsys, corpus_dir):
    """68 files that become 6 documents must not pass without a word: the closing lines say what
    removed them, where the report is, and warn about a stage that removed most of its input."""
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted(corpus_dir.glob("json_*.py")):
        shutil.copy(f, src / f.name)
    for i in range(30):  # too short to keep
        (src / f"tiny_{i}.py").write_text(f"x = {i}\n")
    assert kiln("prepare", f"out={tmp_path / 'run'}", f"data.input={src}", "data.tokenizer.vocab_size=300") == 0
    out = capsys.readouterr().out
    assert "most by too_short (length) 30" in out and f"{tmp_path / 'run' / 'prepare_report.md'}" in out
    assert "warning: stage length removed 30 of the" in out
