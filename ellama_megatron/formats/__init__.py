"""The files the project reads and writes, one reader/writer per format: safetensors files
(safetensors.py), Hugging Face model folders and their shards (hf_folder.py, hf_shards.py),
tokenizer folders (tokenizer_folder.py), torch_dist checkpoints (torch_dist.py), Megatron
checkpoint folders and the record beside them (megatron_checkpoint.py), Megatron's indexed datasets
(indexed_dataset.py: the .bin/.idx pair), and outputs that appear
whole or not at all (atomic.py). This room imports no other room of the package; every other room
reads and writes its files through it."""
