"""Domain vocabulary extension of a byte-level BPE (Llama 3) tokenizer and its model's embeddings."""
