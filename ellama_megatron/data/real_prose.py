"""Real English prose that ships with Debian and Python, for tests and the real-model demo: written
by people, not generated, and on every machine the project runs on (no download).

- ``licence_paragraphs``: the licence texts of /usr/share/common-licenses (Debian's base-files) and
  Python's LICENSE.txt, one document per paragraph, whitespace as in the files (legal English).
- ``python_reference_records``: the Python language reference as pydoc serves it (the stdlib's
  ``pydoc_data.topics``), whole paragraphs grouped into records of about 1,500 characters
  (technical English, a different register from the licences: the demo trains on licences as its
  general replay data and evaluates general perplexity on this, text the run never sees).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from ellama_megatron.data.demo_corpora import write_jsonl

DEBIAN_LICENCES = Path("/usr/share/common-licenses")
RECORD_CHARS = 1500  # python_reference_records: paragraphs are grouped until a record passes this


def licence_paragraphs() -> list[str]:
    files = sorted(p for p in DEBIAN_LICENCES.glob("*") if p.is_file())
    files.append(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt")
    seen, docs = set(), []
    for f in files:
        if not f.exists():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        if text in seen:  # GPL is a link to GPL-3
            continue
        seen.add(text)
        docs += [p for p in text.split("\n\n") if p.strip()]  # as in the file: indentation and line breaks kept
    return docs


def python_reference_records() -> list[dict]:
    """``{"id": "<topic>/<n>", "text": ...}`` for every topic of the language reference, in topic order."""
    from pydoc_data.topics import topics

    records = []
    for name, text in sorted(topics.items()):
        chunk: list[str] = []
        for paragraph in text.split("\n\n"):
            chunk.append(paragraph)
            if sum(map(len, chunk)) >= RECORD_CHARS:
                records.append({"id": f"{name}/{len(records)}", "text": "\n\n".join(chunk)})
                chunk = []
        if "".join(chunk).strip():
            records.append({"id": f"{name}/{len(records)}", "text": "\n\n".join(chunk)})
    return records


def write_real_prose(out_dir: str | Path, reference_records: int) -> dict[str, Path]:
    """prose_licences.jsonl (every licence paragraph) and prose_python_reference.jsonl (the first
    ``reference_records`` records of the language reference) in ``out_dir``, as JSON Lines with an
    ``id`` and a ``text``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    licences = ({"id": f"licence-{i}", "text": t} for i, t in enumerate(licence_paragraphs()))
    return {"prose_licences": write_jsonl(out / "prose_licences.jsonl", licences),
            "prose_python_reference": write_jsonl(out / "prose_python_reference.jsonl",
                                                  python_reference_records()[:reference_records])}
