"""Loads the user's JSON Lines data for the e-commerce tasks (lm-eval `custom_dataset`).

The data folder comes from lm-eval's `--metadata '{"ecom_data_dir": "DIR"}'` or, when that is
not given, from the ELLAMA_ECOM_DATA environment variable. Each task reads
``DIR/<type>_<lang>.jsonl`` (format: docs/evaluation.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REQUIRED = {
    "category": ("title", "choices", "label"),
    "aspect": ("title", "aspect", "choices", "label"),
    "sentiment": ("review", "choices", "label"),
    "relevance": ("query", "title", "choices", "label"),
}


def data_dir(ecom_data_dir: str | None = None) -> Path:
    d = ecom_data_dir or os.environ.get("ELLAMA_ECOM_DATA")
    if not d:
        raise ValueError(
            'e-commerce tasks: no data folder; pass --metadata \'{"ecom_data_dir": "DIR"}\' to lm_eval or set '
            "ELLAMA_ECOM_DATA=DIR (DIR holds <type>_<lang>.jsonl, see docs/evaluation.md; "
            "python -m ellama_megatron.eval.sample_tasks --out DIR writes a sample)"
        )
    return Path(d)


def read_task_file(path: Path, task_type: str) -> list[dict]:
    if not path.is_file():
        raise ValueError(
            f"e-commerce task data {path} does not exist (expected <type>_<lang>.jsonl, see docs/evaluation.md)"
        )
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in REQUIRED[task_type] if k not in rec]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing} for a {task_type} record")
            if not isinstance(rec["choices"], list) or not 0 <= int(rec["label"]) < len(rec["choices"]):
                raise ValueError(f"{path}:{lineno}: label {rec['label']!r} is not an index into choices")
            rec["choices"] = [str(c) for c in rec["choices"]]
            rec["label"] = int(rec["label"])
            docs.append({k: rec[k] for k in REQUIRED[task_type]})
    if not docs:
        raise ValueError(f"{path}: no records")
    return docs


def load_task(task_file: str, task_type: str, ecom_data_dir: str | None = None, **_metadata):
    """lm-eval calls this with the task's metadata and dataset_kwargs; returns {"test": Dataset}."""
    import datasets

    docs = read_task_file(data_dir(ecom_data_dir) / task_file, task_type)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
