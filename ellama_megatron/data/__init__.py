"""Corpus files -> serialized text -> Megatron indexed datasets with manifests -> a planned blend (docs/data.md)."""
