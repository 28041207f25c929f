"""PII scrubbing: emails, IP addresses, phone numbers and common secret/key formats become placeholders."""

from __future__ import annotations

import ipaddress
import re

from kiln.data.document import Document, Stage

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)|\d{3})[\s.-]\d{3}[\s.-]\d{4}(?!\w)")
# (a literal every match contains, pattern): the literal is a cheap `in` test before the regex runs.
SECRETS = [(hint, re.compile(p)) for hint, p in [
    ("PRIVATE KEY-----", r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    ("AKIA", r"AKIA[0-9A-Z]{16}\b"),  # AWS access key ids
    ("ASIA", r"ASIA[0-9A-Z]{16}\b"),
    ("gh", r"gh[pousr]_[A-Za-z0-9]{36,}\b"),  # GitHub tokens
    ("github_pat_", r"github_pat_[A-Za-z0-9_]{60,}\b"),
    ("xox", r"xox[abposr]-[A-Za-z0-9-]{10,}\b"),  # Slack
    ("AIza", r"AIza[0-9A-Za-z_-]{35}\b"),  # Google API keys
    ("sk-", r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b"),  # OpenAI / Anthropic style keys
    ("hf_", r"hf_[A-Za-z0-9]{30,}\b"),  # Hugging Face
    ("_live_", r"[spr]k_live_[A-Za-z0-9]{20,}\b"),  # Stripe
    ("eyJ", r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),  # JWT
]]


def _public_ip(m: re.Match) -> str:
    try:
        ip = ipaddress.ip_address(m.group(0))
    except ValueError:
        return m.group(0)
    return m.group(0) if (ip.is_private or ip.is_loopback or ip.is_unspecified or ip.is_reserved
                          or ip.is_multicast or ip.is_link_local) else "<IP_ADDRESS>"


class ScrubPII(Stage):
    """Replace PII with placeholders (<EMAIL>, <IP_ADDRESS>, <PHONE>, <SECRET>); counts go in meta.

    Private, loopback and reserved IP addresses (192.168.x.x, 127.0.0.1, ...) are not personal and stay.
    """

    name = "pii"

    def __init__(self, emails: bool = True, ips: bool = True, phones: bool = True, secrets: bool = True) -> None:
        self.rules = []  # (kind, literal that must occur, pattern, replacement)
        if secrets:
            self.rules += [("secrets", hint, pat, "<SECRET>") for hint, pat in SECRETS]
        if emails:
            self.rules.append(("emails", "@", EMAIL, "<EMAIL>"))
        if ips:
            self.rules.append(("ips", ".", IPV4, _public_ip))
            self.rules.append(("ips", ":", IPV6, _public_ip))
        if phones:
            self.rules.append(("phones", "", PHONE, "<PHONE>"))

    def process(self, doc: Document) -> Document:
        text = doc.text
        for kind, hint, pattern, repl in self.rules:
            if hint not in text:
                continue
            new, n = pattern.subn(repl, text)
            if new != text:
                doc.meta[f"pii_{kind}"] = doc.meta.get(f"pii_{kind}", 0) + n
                text = new
        doc.text = text
        return doc
