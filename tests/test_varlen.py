"""common.varlen_causal_attention against each released signature of torch's `varlen_attn` (CPU).

The CUDA kernel cannot run here, so each stand-in below has the exact signature of one torch release (read from that
release's torch/nn/attention/varlen.py) and computes what the kernel computes, per document with plain SDPA. A
stand-in raises where the real function would (an unknown keyword, or unequal head counts without enable_gqa), so a
call that works only on some releases fails here. tests/test_gpu.py runs the real kernel."""
import pytest
import torch
import torch.nn.functional as F

import common


def per_document(q, k, v, cu_seqlens, scale, causal):
    """(T, H, D) -> (T, H, D): each document attends only to itself."""
    outs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        out = F.scaled_dot_product_attention(*(x[start:end].transpose(0, 1) for x in (q, k, v)), is_causal=causal,
                                             scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def kernel(q, k, v, cu_seqlens, scale, causal, gqa):
    if k.shape[1] != q.shape[1] and not gqa:
        raise RuntimeError("number of heads in key/value must equal the query's")
    return per_document(q, k, v, cu_seqlens, scale, causal)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return kernel(query, key, value, cu_seq_q, None, is_causal, gqa=False)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):  # as printed by torch 2.11.0+cu130 on the lent H100
    assert window_size in [(-1, -1), (-1, 0)], "only full or causal windows are used here"
    return kernel(query, key, value, cu_seq_q, scale, window_size == (-1, 0), gqa=False)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size in [(-1, -1), (-1, 0)], "only full or causal windows are used here"
    return kernel(query, key, value, cu_seq_q, scale, window_size == (-1, 0), gqa=enable_gqa)


def test_the_installed_torch_has_a_signature_we_test():
    """A new torch release with yet another signature makes this fail: add its stand-in above."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    known = [inspect.signature(f).parameters.keys() for f in (varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_13)]
    assert inspect.signature(varlen_attn).parameters.keys() in known


@pytest.mark.parametrize("release", [varlen_attn_2_10, varlen_attn_2_11, varlen_attn_2_13])
@pytest.mark.parametrize("scale", [None, 0.125, 0.3])  # 0.125 = 1/sqrt(64) is the default; 0.3 is not
def test_each_signature_gives_causal_per_document_attention(monkeypatch, release, scale):
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", release)
    torch.manual_seed(0)
    lengths = [5, 1, 12, 7]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lengths), 8, 64, dtype=torch.float64)
    k, v = torch.randn(2, sum(lengths), 2, 64, dtype=torch.float64)  # grouped-query: 2 key/value heads for 8
    out = common.varlen_causal_attention(q, k, v, cu_seqlens, max(lengths), scale)
    torch.testing.assert_close(out, per_document(q, k, v, cu_seqlens, scale, causal=True), rtol=1e-10, atol=1e-10)
    # and it is not the non-causal answer
    assert not torch.allclose(out, per_document(q, k, v, cu_seqlens, scale, causal=False))
