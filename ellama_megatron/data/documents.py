"""Documents as (record, text) pairs, streamed through the same readers and serializers as
preprocessing (JSONL plain/.gz/.zst, Parquet, Hugging Face folders; structured records through a
template): what the classifier trains on and filters, and the vocabulary extension learns from.
It lives in data/ because it is data reading; classify/ imports nothing from data/ (data's
preprocessing uses the classifier as a filter)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ellama_megatron.data.readers import expand_inputs, read_unit, split_into_units
from ellama_megatron.data.serializers import MissingField, Template, load_template, serialize


@dataclass
class ReadCounts:
    """Records read and skipped, with the first few reasons (for the summary line)."""

    read: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def iter_documents(
    inputs: list[str], template: Template, counts: ReadCounts | None = None
) -> Iterator[tuple[dict, str]]:
    """(record, text) for every usable record of ``inputs``; unusable ones are counted and skipped."""
    counts = counts if counts is not None else ReadCounts()
    for unit in split_into_units(expand_inputs(inputs)):
        for raw in read_unit(unit):
            where = f"{raw.path} {raw.location}"
            if raw.record is None:
                counts.skip(where, raw.error or "unreadable")
                continue
            try:
                text = serialize(raw.record, template)
            except MissingField as e:
                counts.skip(where, f"missing field {e}")
                continue
            counts.read += 1
            yield raw.record, text


def read_texts(
    inputs: list[str], template_name: str = "plain", text_key: str = "text", limit: int | None = None
) -> tuple[list[str], ReadCounts]:
    """All texts of ``inputs`` in memory (training sets are small compared with what is filtered)."""
    counts = ReadCounts()
    texts = []
    for _, text in iter_documents(inputs, load_template(template_name, text_key), counts):
        texts.append(text)
        if limit is not None and len(texts) >= limit:
            break
    return texts, counts
