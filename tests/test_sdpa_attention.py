"""SDPAttention against Megatron-Core's unfused DotProductAttention on CPU, fp32, 1e-5.

The reference needs two CPU accommodations that do not touch the code under test: its score
buffer is allocated on ``torch.cuda.current_device()`` (patched to "cpu") and, given no mask, it
builds a causal mask on "cuda"; it gets an explicit causal mask instead (as Megatron's data loader
would pass), while SDPAttention gets None and must take the causal kernel.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from ellama_megatron.llama.sdpa_attention import SDPAttention, local_layer_spec_with_sdpa

TOL = dict(atol=1e-5, rtol=1e-5)
HEAD_DIM = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_megatron(rank: int, world_size: int, tp: int, port: int) -> None:
    # An explicit init_method leaves os.environ alone: child processes (sbatch in other tests)
    # inherit the environment, and a MASTER_PORT left there points at this process's store.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    # The CPU-safe tracker: the unfused module forks the model-parallel RNG even without dropout.
    tensor_parallel.model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True, force_reset_rng=True)


def _shutdown_megatron() -> None:
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def megatron_tp1():
    if dist.is_initialized():
        pytest.skip("another test left a process group initialised")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(torch.cuda, "current_device", lambda: "cpu")
        _init_megatron(0, 1, 1, _free_port())
        try:
            yield
        finally:
            _shutdown_megatron()


def _config(heads: int, groups: int, **overrides) -> TransformerConfig:
    kw = dict(
        num_layers=2,
        hidden_size=heads * HEAD_DIM,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=HEAD_DIM,
        use_cpu_initialization=True,
        masked_softmax_fusion=False,
        attention_dropout=0.0,
        params_dtype=torch.float32,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def _pair(cfg: TransformerConfig, mask_type=AttnMaskType.causal, layer_number=1, **kw):
    build = dict(config=cfg, layer_number=layer_number, attn_mask_type=mask_type, attention_type="self", **kw)
    return DotProductAttention(**build), SDPAttention(**build)


def _qkv(s: int, b: int, heads: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, b, n, HEAD_DIM, generator=g).requires_grad_() for n in (heads, groups, groups))


def _causal_mask(s: int) -> torch.Tensor:
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]


def _run(module, qkv, mask, upstream, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv)
    out = module(q, k, v, mask, **kw)
    out.backward(upstream)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_same(ref, ours):
    for name, a, b in zip(("output", "dq", "dk", "dv"), ref, ours):
        assert a.shape == b.shape, name
        torch.testing.assert_close(b, a, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (4, 1), (8, 2)])
def test_causal_matches_unfused_outputs_and_grads(megatron_tp1, heads, groups):
    s, b = 24, 3
    ref, ours = _pair(_config(heads, groups))
    qkv = _qkv(s, b, heads, groups)
    upstream = torch.randn(s, b, heads * HEAD_DIM, generator=torch.Generator().manual_seed(9))
    _assert_same(_run(ref, qkv, _causal_mask(s), upstream), _run(ours, qkv, None, upstream))


def test_explicit_padding_mask_matches_unfused(megatron_tp1):
    # Causal plus padded keys per sample, as a loader with padding would pass; no row fully masked.
    s, b, heads, groups = 16, 2, 4, 2
    ref, ours = _pair(_config(heads, groups))
    mask = _causal_mask(s).repeat(b, 1, 1, 1)
    mask[1, :, :, 11:] = True
    mask[1, :, :, 0] = False
    qkv = _qkv(s, b, heads, groups, seed=3)
    upstream = torch.randn(s, b, heads * HEAD_DIM, generator=torch.Generator().manual_seed(4))
    _assert_same(_run(ref, qkv, mask, upstream), _run(ours, qkv, mask, upstream))


def test_no_mask_non_causal_and_custom_scale_match_unfused(megatron_tp1):
    s, b, heads, groups = 10, 2, 4, 2
    ref, ours = _pair(_config(heads, groups), mask_type=AttnMaskType.padding, softmax_scale=0.37)
    qkv = _qkv(s, b, heads, groups, seed=5)
    upstream = torch.randn(s, b, heads * HEAD_DIM, generator=torch.Generator().manual_seed(6))
    _assert_same(_run(ref, qkv, None, upstream), _run(ours, qkv, None, upstream))


def test_query_key_layer_scaling_matches_unfused(megatron_tp1):
    # The parent divides the scale by the layer number and its fp32 softmax multiplies it back.
    s, b, heads, groups = 12, 1, 4, 2
    cfg = _config(heads, groups, apply_query_key_layer_scaling=True, attention_softmax_in_fp32=True)
    ref, ours = _pair(cfg, layer_number=3)
    qkv = _qkv(s, b, heads, groups, seed=7)
    upstream = torch.randn(s, b, heads * HEAD_DIM, generator=torch.Generator().manual_seed(8))
    _assert_same(_run(ref, qkv, _causal_mask(s), upstream), _run(ours, qkv, None, upstream))


def test_packed_thd_sequences_match_unfused_per_sequence(megatron_tp1):
    heads, groups, lengths = 4, 2, [5, 1, 9]
    ref, ours = _pair(_config(heads, groups), mask_type=AttnMaskType.padding_causal)
    t = sum(lengths)
    q, k, v = (x[:, 0] for x in _qkv(t, 1, heads, groups, seed=11))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    out = ours(q, k, v, None, packed_seq_params=params)
    assert out.shape == (t, heads * HEAD_DIM)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        seg = [x[a:b].unsqueeze(1) for x in (q, k, v)]
        want = ref(*seg, _causal_mask(b - a))[:, 0]
        torch.testing.assert_close(out[a:b], want, **TOL)
    with pytest.raises(NotImplementedError, match="sbhd"):
        ours(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu))


def test_dropout_applies_in_training_only(megatron_tp1):
    s, b, heads, groups = 16, 2, 4, 2
    ref, ours = _pair(_config(heads, groups, attention_dropout=0.5))
    q, k, v = (x.detach() for x in _qkv(s, b, heads, groups, seed=12))
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(q, k, v, None), ref(q, k, v, _causal_mask(s)), **TOL)
    ours.train()
    dropped = ours(q, k, v, None)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(dropped, ours.eval()(q, k, v, None))


def test_rejects_what_sdpa_cannot_express(megatron_tp1):
    _, ours = _pair(_config(4, 2))
    q, k, v = (x.detach() for x in _qkv(4, 1, 4, 2))
    with pytest.raises(TypeError, match="bool"):
        ours(q, k, v, torch.zeros(1, 1, 4, 4))
    with pytest.raises(NotImplementedError, match="attention_bias"):
        ours(q, k, v, None, attention_bias=torch.zeros(1))


def test_layer_spec_swaps_only_core_attention(megatron_tp1):
    ours = local_layer_spec_with_sdpa(normalization="RMSNorm")
    stock = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert ours.submodules.self_attention.submodules.core_attention is SDPAttention
    assert stock.submodules.self_attention.submodules.core_attention is DotProductAttention
    # A fresh spec each call: swapping must not leak into Megatron's own spec.
    assert get_gpt_layer_local_spec().submodules.self_attention.submodules.core_attention is DotProductAttention


def test_gpt_model_with_sdpa_spec_matches_unfused_spec(megatron_tp1):
    """A whole Llama-shaped GPTModel: same weights, same logits and gradients with either spec."""
    from megatron.core.models.gpt import GPTModel

    cfg = _config(
        4,
        2,
        normalization="RMSNorm",
        gated_linear_unit=True,
        add_bias_linear=False,
        ffn_hidden_size=96,
        activation_func=torch.nn.functional.silu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
    )

    def build(spec):
        torch.manual_seed(0)
        return GPTModel(
            config=cfg,
            transformer_layer_spec=spec,
            vocab_size=128,
            max_sequence_length=64,
            position_embedding_type="rope",
            rotary_base=500000,
            share_embeddings_and_output_weights=False,
        )

    ref, ours = (
        build(get_gpt_layer_local_spec(normalization="RMSNorm")),
        build(local_layer_spec_with_sdpa(normalization="RMSNorm")),
    )
    ours.load_state_dict(ref.state_dict())
    s, b = 20, 2
    tokens = torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    loss_ref = ref(tokens, positions, _causal_mask(s), labels=tokens).float().mean()
    loss_ours = ours(tokens, positions, None, labels=tokens).float().mean()
    torch.testing.assert_close(loss_ours, loss_ref, **TOL)
    loss_ref.backward(), loss_ours.backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


# ---- TP=2: two gloo processes, each holding half the heads -------------------------------------


def _tp2_worker(rank: int, port: int, result_dir: str) -> None:
    torch.cuda.current_device = lambda: "cpu"  # the reference's score buffer (spawned process only)
    _init_megatron(rank, 2, 2, port)
    try:
        heads, groups, s, b = 8, 4, 16, 2
        cfg = _config(heads, groups, tensor_model_parallel_size=2)
        ref, ours = _pair(cfg)
        assert ours.num_attention_heads_per_partition == 4 and ours.num_query_groups_per_partition == 2
        # Every rank draws the full tensors from one seed and keeps its own heads/groups, as
        # linear_qkv would hand them out (whole query groups per rank).
        full_q, full_k, full_v = _qkv(s, b, heads, groups, seed=21)
        full_up = torch.randn(s, b, heads * HEAD_DIM, generator=torch.Generator().manual_seed(22))
        hq, hk = heads // 2, groups // 2
        qkv = (
            full_q[:, :, rank * hq : (rank + 1) * hq].detach(),
            full_k[:, :, rank * hk : (rank + 1) * hk].detach(),
            full_v[:, :, rank * hk : (rank + 1) * hk].detach(),
        )
        upstream = full_up[:, :, rank * hq * HEAD_DIM : (rank + 1) * hq * HEAD_DIM]
        got = _run(ours, qkv, None, upstream)
        _assert_same(_run(ref, qkv, _causal_mask(s), upstream), got)
        # Gather both ranks' outputs: together they must be the single-process attention.
        parts = [torch.empty_like(got[0]) for _ in range(2)]
        dist.all_gather(parts, got[0].contiguous())
        if rank == 0:
            torch.save(torch.cat(parts, dim=-1), os.path.join(result_dir, "tp2_out.pt"))
    finally:
        _shutdown_megatron()


@pytest.mark.slow
def test_tp2_matches_unfused_and_single_process(megatron_tp1, tmp_path):
    mp.spawn(_tp2_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    heads, groups, s, b = 8, 4, 16, 2
    _, ours = _pair(_config(heads, groups))
    q, k, v = (x.detach() for x in _qkv(s, b, heads, groups, seed=21))
    torch.testing.assert_close(torch.load(tmp_path / "tp2_out.pt"), ours(q, k, v, None), **TOL)
