"""Test inputs for the data pipeline, made on the spot: English prose, HTML pages, WARC, JSONL, Parquet files.

(No tests here; the data tests import these helpers.)
"""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

WORDS = """time person year way day thing world life hand part child eye woman place work week case point
government company number group problem fact water room mother area money story month lot right study book
job word business issue side kind head house service friend father power hour game line end member law car city
community name president team minute idea body information back parent face others level office door health
art war history party result change morning reason research girl guy moment air teacher force education garden
river mountain village market winter summer island forest bridge station kitchen letter window picture music
weather journey harbor lantern meadow orchard pebble quarry saddle thunder valley willow anchor blanket candle
dolphin engine feather glacier helmet insect jacket kettle ladder magnet needle ocean pencil rabbit shadow tunnel
quietly slowly often never always carefully brightly softly suddenly rarely gently proudly nearly barely calmly
build carry follow explain remember discover gather measure protect question travel wander whisper borrow
bright careful distant early gentle heavy honest narrow patient quiet rapid simple steady tender useful warm""".split()
STOP = ["the", "and", "of", "to", "that", "with", "in", "a", "is", "was", "for", "on", "it", "as", "by"]


def sentence(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(8, 15)):
        words.append(rng.choice(STOP) if rng.random() < 0.35 else rng.choice(WORDS))
    return " ".join(words).capitalize() + "."


def prose(seed: int, paragraphs: int = 5) -> str:
    """English-like text that passes the web preset's quality rules."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(sentence(rng) for _ in range(rng.randint(3, 5))) for _ in range(paragraphs)) + "\n"


def html_page(body_text: str, title: str = "A page") -> str:
    paras = "".join(f"<p>{p}</p>\n" for p in body_text.split("\n\n") if p.strip())
    return (f"<!doctype html><html><head><title>{title}</title></head><body>"
            "<nav><a href='/'>Home</a> | <a href='/about'>About</a> | <a href='/contact'>Contact</a></nav>"
            f"<article><h1>{title}</h1>\n{paras}</article>"
            "<footer>Copyright 2024 Example Inc. All rights reserved.</footer></body></html>")


def write_warc(path: Path, pages: list[tuple[str, str]], charset: str = "utf-8", extra: bool = False) -> Path:
    """A WARC.gz of HTTP response records (url, html); `extra` adds a request, a resource and an image record."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=str(path).endswith(".gz"))
        for url, html in pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", f"text/html; charset={charset}")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(html.encode(charset)),
                                                http_headers=headers))
            if extra:
                req = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.com")], is_http_request=True)
                w.write_record(w.create_warc_record(url, "request", payload=io.BytesIO(b""), http_headers=req))
        if extra:
            img = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record("http://example.com/a.png", "response",
                                                payload=io.BytesIO(b"\x89PNG...."), http_headers=img))
            w.write_record(w.create_warc_record("http://example.com/r.txt", "resource",
                                                payload=io.BytesIO(b"plain resource"),
                                                warc_content_type="text/plain"))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    elif str(path).endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int = 10) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path
