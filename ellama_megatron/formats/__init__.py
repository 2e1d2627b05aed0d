"""The files the project reads and writes, one reader/writer per format: safetensors files, Hugging
Face model folders, Megatron checkpoints and their records, and outputs written atomically. This
room imports no other room of the package."""
