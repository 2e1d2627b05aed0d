"""Llama between Hugging Face folders and Megatron torch_dist checkpoints (tools/convert_hf.py).

hf_checkpoint reads and checks a Hugging Face folder; mapping is the weight table; torch_dist writes
and reads Megatron checkpoints tensor by tensor; hf_writer writes Hugging Face folders; importer,
exporter and verify are the three commands.
"""
