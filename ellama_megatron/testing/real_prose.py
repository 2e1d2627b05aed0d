"""Real text that ships with Debian and Python, for tests and the demos: written by people, not
generated, and on every machine the project runs on (no download).

- ``licence_paragraphs``: the licence texts of /usr/share/common-licenses (Debian's base-files) and
  Python's LICENSE.txt, one document per paragraph, whitespace as in the files (legal English).
- ``python_reference_records``: the Python language reference as pydoc serves it (the stdlib's
  ``pydoc_data.topics``), whole paragraphs grouped into records of about 1,500 characters
  (technical English, a different register from the licences: the demo trains on licences as its
  general replay data and evaluates general perplexity on this, text the run never sees).
- ``write_general_prose``: both in one corpus, the tiny demo's general text under ``--general prose``
  (a tiny model cannot memorise it the way it does the synthetic sentences).
- ``python_source_records``: Python's own standard library source (no tests), a real domain for the
  mix sweep's proxy (``--domain code``; code is one of the D-CPT paper's domains). Its learning curve
  is a power law, unlike the synthetic listings', whose templates a tiny model learns outright.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from ellama_megatron.testing.demo_corpora import write_jsonl

DEBIAN_LICENCES = Path("/usr/share/common-licenses")
RECORD_CHARS = 1500  # python_reference_records: paragraphs are grouped until a record passes this
SOURCE_RECORD_CHARS = 2000  # python_source_records: blocks between blank lines, grouped until a record passes this
SOURCE_SKIP = {"test", "tests", "idlelib", "site-packages"}  # stdlib folders that are not library code


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


def add_records(records: list[dict], name: str, text: str, min_chars: int) -> None:
    """Append ``text``'s blocks between blank lines to ``records``, grouped until a record passes
    ``min_chars`` (whole paragraphs, whole functions mostly), each ``{"id": "<name>/<n>", "text"}``."""
    chunk: list[str] = []
    for block in text.split("\n\n"):
        chunk.append(block)
        if sum(map(len, chunk)) >= min_chars:
            records.append({"id": f"{name}/{len(records)}", "text": "\n\n".join(chunk)})
            chunk = []
    if "".join(chunk).strip():
        records.append({"id": f"{name}/{len(records)}", "text": "\n\n".join(chunk)})


def python_reference_records() -> list[dict]:
    """``{"id": "<topic>/<n>", "text": ...}`` for every topic of the language reference, in topic order."""
    from pydoc_data.topics import topics

    records: list[dict] = []
    for name, text in sorted(topics.items()):
        add_records(records, name, text, RECORD_CHARS)
    return records


def write_real_prose(out_dir: str | Path, reference_records: int) -> dict[str, Path]:
    """prose_licences.jsonl (every licence paragraph) and prose_python_reference.jsonl (the first
    ``reference_records`` records of the language reference) in ``out_dir``, as JSON Lines with an
    ``id`` and a ``text``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    licences = ({"id": f"licence-{i}", "text": t} for i, t in enumerate(licence_paragraphs()))
    return {
        "prose_licences": write_jsonl(out / "prose_licences.jsonl", licences),
        "prose_python_reference": write_jsonl(
            out / "prose_python_reference.jsonl", python_reference_records()[:reference_records]
        ),
    }


def write_general_prose(out_dir: str | Path) -> dict[str, Path]:
    """general_prose.jsonl in ``out_dir``: every licence paragraph, then every record of the language
    reference (about 740,000 characters), one corpus whose held-out split is general validation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    licences = [{"id": f"licence-{i}", "text": t} for i, t in enumerate(licence_paragraphs())]
    return {"general_prose": write_jsonl(out / "general_prose.jsonl", licences + python_reference_records())}


def python_source_records(limit: int | None = None) -> list[dict]:
    """``{"id": "<file>/<n>", "text": ...}`` from the standard library's .py files in path order (test
    suites, IDLE and site-packages left out), blocks between blank lines grouped into records of about
    2,000 characters; the first ``limit``. Python 3.12.1 has 4,086 records, 10.8 MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SOURCE_SKIP & set(p.relative_to(root).parts))
    records: list[dict] = []
    for f in files:
        add_records(
            records, str(f.relative_to(root)), f.read_text(encoding="utf-8", errors="replace"), SOURCE_RECORD_CHARS
        )
        if limit is not None and len(records) >= limit:
            break
    return records[:limit]


def write_python_source(out_dir: str | Path, records: int) -> dict[str, Path]:
    """code_python.jsonl in ``out_dir``: the first ``records`` of ``python_source_records``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {"code_python": write_jsonl(out / "code_python.jsonl", python_source_records(records))}
