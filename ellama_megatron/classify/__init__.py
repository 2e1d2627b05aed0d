"""The e-commerce web-page classifier: hashed n-gram features, a linear model, a streaming filter."""

from ellama_megatron.classify.features import FeatureConfig
from ellama_megatron.classify.filter import DomainFilter, FilterStats
from ellama_megatron.classify.model import DomainClassifier, train_classifier

__all__ = ["FeatureConfig", "DomainClassifier", "train_classifier", "DomainFilter", "FilterStats"]
