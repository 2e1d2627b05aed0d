"""Llama between Hugging Face folders and Megatron torch_dist checkpoints (tools/convert_hf.py).

hf_checkpoint checks a Hugging Face folder for conversion; importer, exporter and verify are the
three commands. The files are read and written by ellama_megatron.formats (safetensors, Hugging Face
folders, torch_dist checkpoints and their record), the weight table is ellama_megatron.llama.weights.
"""
