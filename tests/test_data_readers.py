"""Readers and bad input: JSONL (.gz/.zst), Parquet, WARC, HTML extraction, byte-range tasks, corrupt files."""

from __future__ import annotations

import gzip
import json

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


def test_parquet_without_text_column_is_skipped_with_its_name(tmp_path):
    write_parquet(tmp_path / "b.parquet", [{"content": "x"}])
    docs, stats, bad = read_all(tmp_path / "b.parquet")
    assert not docs and stats.dropped["missing_text_column"] == 1
    assert "b.parquet" in bad.messages[0][1] and "content" in bad.messages[0][1]
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


def test_extractor_time_limit(monkeypatch):
    # An extractor that never returns (and swallows ordinary exceptions, as some do): counted, not hung.
    import time

    import kiln.data.extract as extract

    def hangs(html, extractor):
        while True:
            try:
                time.sleep(0.01)
            except Exception:
                pass

    monkeypatch.setattr(extract, "html_to_text", hangs)
    doc = Document("<html><body><p>page</p></body></html>", "slow", {"html": True})
    t0 = time.perf_counter()
    assert ExtractHtml("trafilatura", timeout_s=0.2).process(doc) == "extract_timeout"
    assert time.perf_counter() - t0 < 5
    monkeypatch.undo()
    assert ExtractHtml(timeout_s=5).process(Document("<html></html>", "e", {"html": True})) == "extract_empty"


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
