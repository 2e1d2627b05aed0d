"""Everything about the Llama model in one room.

config: LlamaConfig (dimensions, parameter count, model FLOPs) and the conf/model presets;
hf: Hugging Face config.json <-> LlamaConfig, and Llama 3.1's RoPE scaling constants;
weights: the weight table between Hugging Face and Megatron names, with each row's transform;
megatron: the one Llama -> Megatron-Core translation (arguments, TransformerConfig, layer spec,
GPTModel) that training, conversion checks and benchmarks share.
"""
