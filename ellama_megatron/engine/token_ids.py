"""Token ids checked against the model's vocabulary, before the embedding sees them.

An id at or past ``model.vocab_size`` (or below 0) indexes past the embedding table: on a CPU an
IndexError in the rank that reads it, on a GPU a device-side assert that names nothing, at the
first batch that holds it. A dataset preprocessed here records its tokenizer, and run/checks.py
refuses it before the launch when that differs from the model's (data/manifest.py); a dataset
written by another tool (Megatron-LM's tools/preprocess_data.py, IndexedDatasetBuilder) records
nothing, so:

- Before the launch (run/checks.py), data/vocabulary_check.py reads a sample of the documents of
  each such prefix, the first, the last and evenly spaced ones between, and the run is refused on an
  id outside the vocabulary: a dataset tokenized with another tokenizer is refused in seconds.
- In every rank that reads data, ``TokenIdCheck`` takes the largest id of each micro-batch (read as
  unsigned: a negative id counts as too large) on the host, before the batch is copied to the GPU
  (no device sync), and raises BadData (run/faults.py) naming the dataset's prefix, the document
  and the id; only then is the offending sample traced back to its document (``SampleOrigins``:
  every sample carries its number on the rank, which gives its dataset and index). The rank records
  it and exits; the launcher stops the run with that one line, exit 2, no relaunch (run/faults.py:
  bad_data).

"Document" is what Megatron's GPTDataset calls one: a sequence of the indexed dataset, the one
``IndexedDataset(prefix)[document]`` reads (a document unless the data was preprocessed with
sentence splitting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ellama_megatron.data.vocabulary_check import first_outside, out_of_vocabulary
from ellama_megatron.formats.indexed_dataset import read_documents
from ellama_megatron.run.faults import BadData

# A sample's number on this rank, unique across its datasets (SampleOrigins): one plain int per sample,
# which the data loader's collate turns into one tensor per batch.
ORIGIN_KEY = "origin"

_ORIGINS: list[SampleOrigins] = []  # this rank's traced datasets, in the order of their sample numbers


class SampleOrigins:
    """A dataset whose samples carry where they come from (``ORIGIN_KEY``: the sample's index plus
    the dataset's first number on this rank), so that a rejected micro-batch can be traced back to its
    documents. Wraps what Megatron's builder returns (a BlendedDataset over GPTDatasets, or one GPTDataset)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.split = getattr(dataset, "split", None) or dataset.index_split  # Megatron picks its sampler by it
        self.first = sum(len(o) for o in _ORIGINS)
        _ORIGINS.append(self)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], ORIGIN_KEY: self.first + int(index)}

    @staticmethod
    def of(number: int) -> tuple[SampleOrigins, int]:
        """The dataset and the index of this rank's sample ``number``."""
        for origins in _ORIGINS:
            if origins.first <= number < origins.first + len(origins):
                return origins, number - origins.first
        raise KeyError(f"no dataset on this rank has sample number {number}")

    def documents(self, index: int) -> tuple[str, list[int]]:
        """(prefix, document indices) of sample ``index``."""
        from megatron.core.datasets.blended_dataset import BlendedDataset

        dataset = self.dataset
        if isinstance(dataset, BlendedDataset):
            dataset[index]  # loads the blend's indices where they are mapped lazily
            dataset, index = dataset.datasets[dataset.dataset_index[index]], dataset.dataset_sample_index[index]
        # Megatron's own sample -> documents mapping (GPTDataset.__getitem__ reads the sample through it).
        _, documents, _ = dataset._query_document_sample_shuffle_indices(int(index))
        return dataset.dataset_path, [int(d) for d in documents]


@dataclass(frozen=True)
class TokenIdCheck:
    """Every micro-batch's ids against the vocabulary, on the host (the batch as the data loader
    returns it, before the copy to the GPU)."""

    vocab_size: int

    def __call__(self, batch: dict) -> None:
        # tokens and labels both index the vocabulary (the embedding, the cross-entropy): the labels are
        # the tokens shifted by one, so each holds an id the other does not (the first, the last).
        # One max each: read as unsigned, a negative id is larger than any vocabulary.
        if max(_largest_unsigned(batch["tokens"]), _largest_unsigned(batch["labels"])) >= self.vocab_size:
            raise BadData(self.locate(batch))

    def locate(self, batch: dict) -> str:
        """The refusal naming the prefix, the document and the id (the first bad sample's)."""
        for key in ("tokens", "labels"):
            ids = batch[key].numpy()
            rows = np.flatnonzero(((ids < 0) | (ids >= self.vocab_size)).any(axis=1))
            if rows.size:
                row, token_id = int(rows[0]), first_outside(ids[rows[0]], self.vocab_size)
                break
        origin = batch.get(ORIGIN_KEY)
        if origin is None:  # a batch from a dataset not wrapped in SampleOrigins: the id is all there is to say
            return (
                f"a batch holds token id {token_id}, outside the model's vocabulary "
                f"(model.vocab_size={self.vocab_size}); preprocess the data with the model's tokenizer"
            )
        origins, index = SampleOrigins.of(int(origin[row]))
        prefix, documents = origins.documents(index)
        for document, ids in read_documents(prefix, documents):
            bad = first_outside(ids, self.vocab_size)
            if bad is not None:
                return out_of_vocabulary(prefix, document, bad, self.vocab_size)
        # Not reached: a sample is cut from its documents' ids.
        return out_of_vocabulary(prefix, documents[0], token_id, self.vocab_size)


def _largest_unsigned(ids) -> int:
    """The largest of a CPU tensor's ids, its negative ones read as the huge unsigned numbers they are
    in two's complement (numpy's max: faster than torch.aminmax on such host tensors, docs/benchmarks.md)."""
    values = ids.numpy()
    return int(values.view(f"u{values.itemsize}").max())
