"""A real-text classification task that any machine can build offline: Python docstrings by topic.

    python recipes/data/make_docstrings.py      # -> recipes/data/docstrings-{train,eval}.jsonl

Rows are the first paragraph of the docstrings of public functions, classes and methods of the
Python standard library (English prose written by people, not generated), labelled with the
topic of the module they come from:
    files     os, os.path, shutil, pathlib, glob, fnmatch, tempfile, filecmp, zipfile, tarfile
    numbers   math, cmath, statistics, decimal, fractions, random, numbers
    network   socket, ssl, http.client, http.server, urllib.request, urllib.parse, smtplib,
              ftplib, email.message, ipaddress, imaplib, poplib
    text      string, textwrap, difflib, re, unicodedata, codecs, html, html.parser
    time      datetime, time, calendar, zoneinfo, sched
    concurrency  threading, multiprocessing, concurrent.futures, asyncio, queue, subprocess
Deterministic for a given Python version (the docstrings change a little between versions; the
files record the version). Rows of 5-80 words, de-duplicated; the split is by a hash of the text,
so one docstring never lands in both. Not committed (made from the interpreter's own sources).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import platform
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = {
    "files": "os os.path shutil pathlib glob fnmatch tempfile filecmp zipfile tarfile",
    "numbers": "math cmath statistics decimal fractions random numbers",
    "network": "socket ssl http.client http.server urllib.request urllib.parse smtplib ftplib "
    "email.message ipaddress imaplib poplib",
    "text": "string textwrap difflib re unicodedata codecs html html.parser",
    "time": "datetime time calendar zoneinfo sched",
    "concurrency": "threading multiprocessing concurrent.futures asyncio queue subprocess",
}


def _docstrings(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            found.append(obj)
            if inspect.isclass(obj):
                found += [m for n, m in vars(obj).items() if not n.startswith("_") and callable(m)]
    texts = []
    for obj in found:
        doc = inspect.getdoc(obj) or ""
        paragraph = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
        if 5 <= len(paragraph.split()) <= 80 and "(" not in paragraph[:1]:
            texts.append(paragraph)
    return texts


def build(eval_share: float = 0.2) -> dict[str, list[dict]]:
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {"train": [], "eval": []}
    for topic, modules in TOPICS.items():
        for module_name in modules.split():
            for text in _docstrings(module_name):
                if text in seen:
                    continue
                seen.add(text)
                bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 1000
                split = "eval" if bucket < eval_share * 1000 else "train"
                rows[split].append({"text": text, "label": topic, "module": module_name})
    return rows


if __name__ == "__main__":
    rows = build()
    for split, items in rows.items():
        path = HERE / f"docstrings-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        counts = {t: sum(r["label"] == t for r in items) for t in TOPICS}
        print(f"{path}: {len(items)} rows {counts} (Python {platform.python_version()})")
