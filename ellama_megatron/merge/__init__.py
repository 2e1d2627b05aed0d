"""Weight merging of a base and an adapted model (linear, SLERP, task arithmetic), streamed in row
chunks: Hugging Face folders (merge_hf.py) or Megatron checkpoints (merge_megatron.py)."""
