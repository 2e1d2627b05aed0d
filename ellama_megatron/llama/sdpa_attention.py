"""Core attention through PyTorch's scaled_dot_product_attention, for Megatron-Core's local spec.

Without Transformer Engine, Megatron-Core's local layer spec computes attention with
``DotProductAttention``: it materialises the [b, heads, s, s] score matrix (2 GiB per layer in bf16
for 8B at sequence 8192 and micro-batch 1, times the heads per rank) and repeats K/V for GQA.
``SDPAttention`` is a drop-in replacement for that ``core_attention`` submodule: same constructor,
same forward, same (empty) checkpoint entries, but the score matrix is never built; PyTorch picks the
flash / cuDNN / memory-efficient kernel on a GPU and its math kernel on CPU.

It subclasses ``DotProductAttention`` to keep its constructor checks (context parallel, head
divisibility), per-partition sizes under TP, softmax scale and ``sharded_state_dict``; only forward
differs.

Masks follow Megatron's convention: a bool tensor broadcastable to [b, heads, sq, sk] where True
means *masked out*. With no mask and a causal mask type, the causal kernel runs (``is_causal``);
an explicit mask is honoured exactly as the unfused module does, which rules out the flash kernel:
let the data loader create no mask (``create_attention_mask: false``) for speed.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.utils import is_layer_window_attention
from torch import Tensor


class SDPAttention(DotProductAttention):
    """Megatron core attention computed by ``torch.nn.functional.scaled_dot_product_attention``.

    Inputs are Megatron's [s, b, heads, head_dim] (query: this rank's heads, key/value: this rank's
    query groups); the output is [s, b, heads * head_dim] like ``DotProductAttention``'s. Packed
    sequences (``qkv_format="thd"``, [t, heads, head_dim]) run one causal call per sequence.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        # What the unfused softmax supports but a single SDPA call cannot express: refuse at build
        # time, not at the first step.
        if cfg.softmax_type != "vanilla":
            raise NotImplementedError(
                f"SDPAttention: softmax_type={cfg.softmax_type!r} needs a softmax offset that "
                "scaled_dot_product_attention cannot add; use impl.attention=unfused"
            )
        if is_layer_window_attention(cfg.window_size, cfg.window_attn_skip_freq, self.layer_number):
            raise NotImplementedError(
                "SDPAttention: sliding-window attention is not supported; "
                "use impl.attention=unfused or impl.transformer=te"
            )
        # The parent divides the scale by layer_number for apply_query_key_layer_scaling and
        # multiplies it back inside its fp32 softmax; the product is what the scores see.
        self.sdpa_scale = self.softmax_scale * (self.layer_number if cfg.apply_query_key_layer_scaling else 1)
        self._warned_explicit_mask = False

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        dropout_p = self.attention_dropout.p if self.training else 0.0

        if packed_seq_params is not None:
            return self._packed_forward(query, key, value, mask_type, dropout_p, packed_seq_params)

        # [s, b, n, d] -> [b, n, s, d]: a view; every SDPA kernel accepts these strides.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        attn_mask, is_causal = self._sdpa_mask(attention_mask, mask_type, q.size(2), k.size(2))
        context = self._attend(q, k, v, attn_mask, is_causal, dropout_p)
        # [b, n, sq, d] -> [sq, b, n*d], the layout linear_proj expects.
        return context.permute(2, 0, 1, 3).reshape(context.size(2), context.size(0), -1)

    def _sdpa_mask(
        self, attention_mask: Tensor | None, mask_type: AttnMaskType, sq: int, sk: int
    ) -> tuple[Tensor | None, bool]:
        if attention_mask is None:
            if mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal) and sq > 1:
                # Megatron's unfused softmax only builds a causal mask for self attention.
                if sq != sk:
                    raise ValueError(f"SDPAttention: causal mask needs sq == sk, got {sq} vs {sk}")
                return None, True
            return None, False
        if attention_mask.dtype != torch.bool:
            raise TypeError(
                "SDPAttention: attention_mask must be bool (True = masked out, Megatron's "
                f"convention), got {attention_mask.dtype}"
            )
        if attention_mask.is_cuda and not self._warned_explicit_mask:
            self._warned_explicit_mask = True
            warnings.warn(
                "SDPAttention: an explicit attention mask rules out the flash kernel; "
                "create no mask in the data loader to get it (causal is then implied)",
                # This module's own line: the caller's frame is torch's Module._call_impl, which tells nothing.
                stacklevel=1,
            )
        # SDPA's bool mask means the opposite: True = may attend.
        return ~attention_mask, False

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
    ) -> Tensor:
        # GQA: K/V keep their own head count; SDPA shares each group across its query heads
        # without materialising repeated K/V (flash and math kernels).
        kwargs = dict(
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.sdpa_scale,
            enable_gqa=q.size(1) != k.size(1),
        )
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as the unfused module: heads differ across TP ranks, so do the masks.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def _packed_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask_type: AttnMaskType,
        dropout_p: float,
        params: PackedSeqParams,
    ) -> Tensor:
        if params.qkv_format != "thd":
            raise NotImplementedError(
                f"SDPAttention: packed sequences in format {params.qkv_format!r}; only 'thd' is "
                "supported (or use impl.transformer=te)"
            )
        for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            padded = getattr(params, name)
            plain = params.cu_seqlens_q if name.endswith("q_padded") else params.cu_seqlens_kv
            if padded is not None and not torch.equal(padded, plain):
                raise NotImplementedError(f"SDPAttention: padding between packed sequences ({name})")
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        bounds_q = params.cu_seqlens_q.tolist()
        bounds_kv = params.cu_seqlens_kv.tolist()
        # One call per sequence keeps causal kernels usable and never builds a [t, t] mask;
        # packing is for fine-tuning data, not the CPT hot path.
        outputs = []
        for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_kv, bounds_kv[1:])):
            # [t, n, d] -> [1, n, t, d]
            q, k, v = (
                t[a:b].permute(1, 0, 2).unsqueeze(0) for t, a, b in ((query, q0, q1), (key, k0, k1), (value, k0, k1))
            )
            is_causal = causal and (q1 - q0) > 1
            if is_causal and (q1 - q0) != (k1 - k0):
                raise ValueError("SDPAttention: causal packed sequences need equal q/kv lengths")
            outputs.append(self._attend(q, k, v, None, is_causal, dropout_p)[0].permute(1, 0, 2))
        context = torch.cat(outputs, dim=0)
        # Tokens past the last sequence (padding to a fixed pack size) attend nothing.
        if context.size(0) < query.size(0):
            pad = query.new_zeros(query.size(0) - context.size(0), *context.shape[1:])
            context = torch.cat([context, pad], dim=0)
        # [t, n, d] -> [t, n*d]; Attention reshapes it to [t, 1, n*d].
        return context.reshape(context.size(0), -1)


def local_layer_spec_with_sdpa(**local_spec_kwargs) -> ModuleSpec:
    """Megatron-Core's local GPT layer spec with ``SDPAttention`` as core attention.

    ``local_spec_kwargs`` go to ``get_gpt_layer_local_spec`` unchanged; for Llama pass
    ``normalization="RMSNorm"`` (and ``qk_layernorm=False``, the default).
    """
    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    attention = spec.submodules.self_attention
    if getattr(attention.submodules, "core_attention", None) is not DotProductAttention:
        raise ValueError(
            "local_layer_spec_with_sdpa: this layer spec has no DotProductAttention to replace "
            "(multi-latent attention?)"
        )
    attention.submodules.core_attention = SDPAttention
    return spec
