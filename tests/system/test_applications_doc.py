"""Run the examples of docs/applications.md.

Conventions of the document: each ``## `` section's ```python blocks run
together in a fresh interpreter (a block whose first line is ``# file: NAME``
is written to that file instead, and a ``settings.py`` makes it a Django
project); ``/var/spool/mailout`` becomes a temporary queue folder;
``<!-- not run: REASON -->`` before a block skips it; ``<!-- requires: MOD -->``
skips the block when MOD cannot be imported; ``<!-- expect: queued=N -->``
after a block checks how many messages the section left in the queue."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from twisted_mailout.queue.store import Queue

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "applications.md"

BLOCK = re.compile(r"(?P<pre>(?:<!--[^\n]*-->\n)*)```(?P<lang>\w*)\n(?P<code>.*?)```\n"
                   r"(?P<post>(?:<!--[^\n]*-->\n)*)", re.S)


def sections():
    text = DOC.read_text()
    out = []
    for chunk in re.split(r"^## ", text, flags=re.M)[1:]:
        title = chunk.split("\n", 1)[0].strip()
        blocks = []
        for m in BLOCK.finditer(chunk):
            if m.group("lang") != "python":
                continue
            pre, post = m.group("pre"), m.group("post")
            blocks.append({
                "code": m.group("code"),
                "skip": re.search(r"<!-- not run: (.*?) -->", pre),
                "requires": re.findall(r"<!-- requires: (\S+) -->", pre),
                "expect": [int(n) for n in re.findall(r"<!-- expect: queued=(\d+) -->", post)],
            })
        if blocks:
            out.append((title, blocks))
    return out


SECTIONS = sections()
RUNNABLE = [(t, b) for t, b in SECTIONS if not all(x["skip"] for x in b)]


def test_the_document_has_examples_and_every_skip_gives_a_reason():
    assert len(SECTIONS) >= 6
    for _, blocks in SECTIONS:
        for b in blocks:
            if b["skip"]:
                assert b["skip"].group(1).strip()


@pytest.mark.parametrize("title,blocks", RUNNABLE, ids=[t.split(":")[0] for t, _ in RUNNABLE])
def test_section_examples_run(tmp_path, title, blocks):
    spool = tmp_path / "spool"
    code, files, expected, ran = [], {}, None, 0
    missing = []
    for b in blocks:
        if b["skip"]:
            continue
        absent = [m for m in b["requires"] if importlib.util.find_spec(m) is None]
        if absent:
            missing += absent
            continue
        text = b["code"].replace("/var/spool/mailout", str(spool))
        first = text.split("\n", 1)[0]
        if first.startswith("# file: "):
            files[first[len("# file: "):].strip()] = text
            continue
        code.append(text)
        ran += 1
        if b["expect"]:
            expected = (expected or 0) + b["expect"][0]
    if not code:
        pytest.skip(f"no example of {title!r} can run here: {', '.join(missing)} missing")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    prelude = ""
    if "settings.py" in files:
        prelude = ("import os, django\nos.environ['DJANGO_SETTINGS_MODULE'] = 'settings'\n"
                   "django.setup()\n")
    script = tmp_path / "example.py"
    script.write_text(prelude + "\n".join(code))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{title}:\n{r.stdout}\n{r.stderr}"
    if expected is not None:
        count = len(Queue(str(spool)).incoming()) if spool.exists() else 0
        assert count == expected, f"{title}: {count} queued, expected {expected}"
