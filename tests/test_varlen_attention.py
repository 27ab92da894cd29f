"""Packed rows in one attention call == one SDPA call per sample, forward and backward."""
from __future__ import annotations

import pytest
import torch

from megavlm.models.common.attention import reference_varlen_attention, varlen_attention


def _inputs(lengths, tail=0, hq=4, hk=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths) + tail
    q, k, v = (torch.randn(t, h, d, generator=g, requires_grad=True) for h in (hq, hk, hk))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    return q, k, v, cu


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths, tail", [([5, 1, 9, 3], 0), ([1], 0), ([7, 2, 1, 12, 4], 3), ([3, 0, 6], 2)],
                         ids=["ragged", "single-token", "padding-tail", "empty-segment"])
def test_varlen_matches_per_sample_reference(causal, lengths, tail):
    q, k, v, cu = _inputs(lengths, tail)
    grad = torch.randn(q.shape[0], q.shape[1], v.shape[-1], generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for fn in (varlen_attention, reference_varlen_attention):
        out = fn(q, k, v, cu, cu, causal, 0.3)
        (out * grad).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.all(outs[0][sum(lengths):] == 0)           # rows after the last sample
    assert torch.isfinite(torch.stack([g.abs().sum() for g in grads[0]])).all()


def test_a_token_never_sees_another_sample():
    q, k, v, cu = _inputs([4, 6])
    base = varlen_attention(q, k, v, cu, cu, True, 0.3).detach()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[4:] += 5.0
    v2[4:] -= 3.0                                              # change only the second sample
    moved = varlen_attention(q, k2, v2, cu, cu, True, 0.3).detach()
    assert torch.equal(moved[:4], base[:4])
    assert not torch.allclose(moved[4:], base[4:])
