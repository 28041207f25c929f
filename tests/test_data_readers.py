"""Readers and bad input: JSONL (.gz/.zst), Parquet, WARC, HTML extraction, byte-range tasks, corrupt files."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import pytest
from test_data_helpers import html_page, prose, write_jsonl, write_parquet, write_warc

from kiln.config import ReaderConfig
from kiln.data.document import BadInput, Document, StageStats
from kiln.data.extract import ExtractHtml
from kiln.data.sources import plan_tasks, read_task
from kiln.errors import KilnError


def read_all(spec, reader=None, strict=False, target=1 << 30):
    reader = reader or ReaderConfig()
    stats = StageStats("read")
    bad = BadInput(stats, strict=strict)
    docs = [d for t in plan_tasks(str(spec), reader, target) for d in read_task(t, reader, bad)]
    return docs, stats, bad


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_with_configurable_text_field(tmp_path, suffix):
    recs = [{"body": prose(i), "id": f"doc{i}", "url": f"http://site{i}.com/"} for i in range(5)]
    write_jsonl(tmp_path / f"a{suffix}", recs)
    docs, stats, _ = read_all(tmp_path / f"a{suffix}", ReaderConfig(text_field="body"))
    assert [d.id for d in docs] == [f"doc{i}" for i in range(5)]
    assert docs[2].text == prose(2) and docs[2].meta["url"] == "http://site2.com/"
    docs, stats, bad = read_all(tmp_path / f"a{suffix}")  # default field "text" is missing
    assert not docs and stats.dropped["missing_text_field"] == 5
    assert "set data.reader.text_field" in bad.messages[0][1] and f"a{suffix}' line 1" in bad.messages[0][1]


def test_jsonl_byte_ranges_read_every_line_once(tmp_path):
    recs = [{"text": f"record {i} " + "x" * (i * 7 % 50)} for i in range(300)]
    write_jsonl(tmp_path / "big.jsonl", recs)
    whole, _, _ = read_all(tmp_path / "big.jsonl")
    tasks = plan_tasks(str(tmp_path / "big.jsonl"), ReaderConfig(task_bytes=500), 500)
    assert len(tasks) > 10
    split, _, _ = read_all(tmp_path / "big.jsonl", ReaderConfig(task_bytes=500), target=500)
    assert [d.text for d in split] == [d.text for d in whole] == [r["text"] for r in recs]


def test_parquet_streamed_by_row_groups(tmp_path):
    recs = [{"text": prose(i, 1), "id": i} for i in range(45)]
    write_parquet(tmp_path / "a.parquet", recs, row_group_size=10)
    reader = ReaderConfig(task_bytes=1)  # one task per row group
    tasks = plan_tasks(str(tmp_path / "a.parquet"), reader, 1)
    assert [(t.start, t.end) for t in tasks] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    docs, _, _ = read_all(tmp_path / "a.parquet", reader, target=1)
    assert [d.text for d in docs] == [r["text"] for r in recs] and docs[44].id == "44"


def test_parquet_without_text_column_counts_its_rows(tmp_path):
    write_parquet(tmp_path / "b.parquet", [{"content": f"row {i}"} for i in range(30)], row_group_size=10)
    docs, stats, bad = read_all(tmp_path / "b.parquet")
    assert not docs and stats.dropped["missing_text_column"] == 30 and stats.docs_out == 0
    assert len(bad.messages) == 1 and "b.parquet" in bad.messages[0][1] and "content" in bad.messages[0][1]
    # Split into one task per row group, the tasks count their own rows.
    docs, stats, bad = read_all(tmp_path / "b.parquet", ReaderConfig(task_bytes=1), target=1)
    assert stats.dropped["missing_text_column"] == 30
    with pytest.raises(KilnError, match="no column 'text'.*data.strict=false"):
        read_all(tmp_path / "b.parquet", strict=True)


def test_warc_reads_http_responses_and_charsets(tmp_path):
    pages = [(f"http://example.com/{i}", html_page(prose(i), f"Page {i}")) for i in range(3)]
    pages.append(("http://example.de/umlaut", html_page("Grüße aus Köln, schöne Straße. " * 20, "Köln")))
    write_warc(tmp_path / "crawl.warc.gz", pages, charset="iso-8859-1", extra=True)
    docs, stats, _ = read_all(tmp_path / "crawl.warc.gz")
    assert [d.meta["url"] for d in docs] == [u for u, _ in pages]
    assert all(d.meta["html"] and d.meta["encoding"] == "iso-8859-1" for d in docs)
    assert "Grüße aus Köln" in docs[3].text
    assert stats.dropped["warc_request_record"] == 4 and stats.dropped["warc_not_html"] == 1
    assert stats.dropped["warc_resource_record"] == 1
    ex = ExtractHtml()
    text = ex.process(docs[0]).text
    assert prose(0).split(".")[0] in text and "Copyright" not in text and "Contact" not in text


def test_extract_stops_a_page_that_hangs_the_c_extractor():
    # Divs nested 40,000 deep, never closed: resiliparse's C extractor needs minutes on this page (its
    # time grows faster than the square of the depth), and no signal handler can interrupt C code. The
    # stage kills the process extracting it once the limit passes, and the next page gets a new one.
    hostile = Document("<html><body>" + "<div>" * 40000 + "never closed", "deep", {"html": True})
    ex = ExtractHtml(timeout_s=1.0)
    assert prose(1).split(".")[0] in ex.process(Document(html_page(prose(1)), "a", {"html": True})).text
    pid = ex.worker.proc.pid
    t0 = time.perf_counter()
    assert ex.process(hostile) == "extract_timeout"
    assert time.perf_counter() - t0 < 5 and ex.worker.proc is None
    with pytest.raises(ProcessLookupError):  # killed, not left running
        os.kill(pid, 0)
    assert prose(2).split(".")[0] in ex.process(Document(html_page(prose(2)), "b", {"html": True})).text
    assert ex.worker.proc.pid != pid
    assert ex.process(Document("<html></html>", "e", {"html": True})) == "extract_empty"
    ex.worker.close()


def test_extract_worker_dies_with_its_parent(tmp_path):
    # A prepare killed (or a pool worker terminated) while its extractor is stuck in C code must not leave
    # that extractor running for hours.
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys\n"
        "from kiln.data.document import Document\n"
        "from kiln.data.extract import ExtractHtml\n"
        "ex = ExtractHtml(timeout_s=600)\n"
        "ex.process(Document('<p>warm</p>', 'w', {'html': True}))\n"
        "print(ex.worker.proc.pid, flush=True)\n"
        "ex.process(Document('<html><body>' + '<div>' * 40000, 'deep', {'html': True}))\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(0.3)  # the child is now inside the C extractor
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited; its parent (init) reaps it
    except FileNotFoundError:
        return False


def test_json_error_messages_name_the_column_once(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "a control \x01 character"}\n{"text": "fine"}\n')
    docs, stats, bad = read_all(tmp_path / "c.jsonl")
    assert [d.text for d in docs] == ["fine"] and stats.dropped["malformed_json"] == 1
    line = bad.messages[0][1]
    assert "c.jsonl' line 1: not valid JSON (Invalid control character at column 21)" in line and "at at" not in line


def test_bad_files_are_skipped_counted_and_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": prose(1)}])
    gz = gzip.compress(b"".join(json.dumps({"text": prose(i)}).encode() + b"\n" for i in range(50)))
    (tmp_path / "corrupt.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    import zstandard

    zs = zstandard.ZstdCompressor().compress(b'{"text": "hello there"}\n' * 1000)
    (tmp_path / "corrupt.jsonl.zst").write_bytes(zs[:-8] + b"\x00garbage")
    (tmp_path / "lines.jsonl").write_bytes(b'{"text": "fine line one"}\n{"text": "bad \xff\xfe utf8"}\n'
                                           b'{"text": broken json\n[1, 2]\n{"text": "fine line two"}\n')
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "huge.jsonl").write_bytes(b'{"text": "' + b"a" * 50_000_000 + b'"}\n{"text": "after the huge line"}\n')
    (tmp_path / "huge.txt").write_bytes(b"b" * 50_000_000)
    (tmp_path / "empty.txt").write_bytes(b"")
    write_warc(tmp_path / "cut.warc.gz", [(f"http://e.com/{i}", html_page(prose(i))) for i in range(5)])
    data = (tmp_path / "cut.warc.gz").read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(data[: int(len(data) * 0.7)])
    (tmp_path / "notwarc.warc").write_bytes(b"this is not a warc file at all\n" * 10)
    reader = ReaderConfig(max_record_bytes=10_000_000)
    docs, stats, bad = read_all(tmp_path, reader)
    texts = [d.text for d in docs]
    assert prose(1) in texts and "fine line one" in texts and "fine line two" in texts
    assert "after the huge line" in texts
    d = stats.dropped
    assert d["corrupt_compressed"] == 2 and d["invalid_utf8"] == 1 and d["malformed_json"] == 2
    assert d["empty_file"] == 2 and d["record_too_large"] == 2 and d["truncated_warc"] == 1
    assert d["invalid_warc"] == 1
    assert 0 < sum(1 for t in texts if t.startswith("<!doctype")) < 5  # the WARC's records before the cut
    lines = "\n".join(m for _, m in bad.messages)
    for name in ("corrupt.jsonl.gz", "corrupt.jsonl.zst", "lines.jsonl' line 2", "lines.jsonl' line 3",
                 "empty.jsonl", "huge.jsonl' line 1", "huge.txt", "cut.warc.gz", "notwarc.warc"):
        assert name in lines, name
    with pytest.raises(KilnError, match=r"lines.jsonl' line 2: invalid UTF-8"):
        read_all(tmp_path / "lines.jsonl", reader, strict=True)
    assert good.exists()


def test_text_files_in_other_encodings(tmp_path):
    (tmp_path / "latin.txt").write_bytes("Ein schöner Tag in Köln, grüße.".encode("cp1252") * 5)
    docs, stats, _ = read_all(tmp_path / "latin.txt")
    assert "schöner" in docs[0].text and docs[0].meta["encoding"] != "utf-8"
