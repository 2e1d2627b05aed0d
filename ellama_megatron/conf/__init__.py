"""The Hydra presets (config groups), shipped as package data.

Recipes compose them through Hydra's searchpath ``pkg://ellama_megatron.conf`` and tools through
``ellama_megatron.CONF_DIR``, so a wheel install finds every preset. Presets of your own go in a
folder of the same layout (``model/my_model.yaml``, ...) added with ``--config-dir DIR`` or
``hydra.searchpath=[file:///abs/DIR]``.
"""
