"""Triton kernels against their plain-PyTorch references (CPU: TRITON_INTERPRET=1, small shapes)."""
from __future__ import annotations

import pytest
import torch

from megavlm.kernels.cross_entropy import IGNORE_INDEX, reference_cross_entropy, triton_cross_entropy
from megavlm.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, reference_linear_cross_entropy
from megavlm.kernels.fused_mlp import fused_mlp, reference_mlp
from megavlm.kernels.pixel_shuffle_norm import pixel_shuffle_norm, reference_pixel_shuffle_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3)}


def _grads(fn, *inputs, grad_out=None):
    out = fn(*inputs)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), [t.grad.detach().clone() if t is not None and t.grad is not None else None for t in inputs]


def _leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


def assert_as_accurate_as_eager(ours, eager, ref, label=""):
    """Low precision: our error vs the fp32 reference is at most twice eager PyTorch's error in
    the same dtype (plus a hair), instead of a tolerance picked by hand."""
    ours_err = (ours.float() - ref.float()).abs().max().item()
    eager_err = (eager.float() - ref.float()).abs().max().item()
    assert ours_err <= 2 * eager_err + 1e-3 * (1 + ref.abs().max().item()), f"{label}: {ours_err} vs eager {eager_err}"


# ---- masked cross-entropy ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab, valid", [(7, 100, 100), (33, 130, 127), (1, 17, 17)])
def test_cross_entropy_matches_reference(dtype, rows, vocab, valid):
    g = torch.Generator().manual_seed(rows * vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    targets = torch.randint(0, valid, (rows,), generator=g)
    targets[::3] = IGNORE_INDEX
    grad_out = torch.rand(rows, generator=g)
    ours, (g_ours, _) = _grads(lambda x, t: triton_cross_entropy(x, t, valid), _leaf(logits), targets, grad_out=grad_out)
    ref, (g_ref, _) = _grads(lambda x, t: reference_cross_entropy(x, t, valid), _leaf(logits), targets, grad_out=grad_out)
    torch.testing.assert_close(ours, ref, **TOL[torch.float32 if dtype == torch.float32 else torch.float16])
    torch.testing.assert_close(g_ours.float(), g_ref.float(), **TOL[dtype])
    assert g_ours.dtype == dtype and torch.all(g_ours[:, valid:] == 0)  # TP padding columns
    assert torch.all(ours[targets == IGNORE_INDEX] == 0) and torch.all(g_ours[targets == IGNORE_INDEX] == 0)


def test_cross_entropy_all_rows_ignored_and_3d_inputs():
    logits = torch.randn(2, 3, 40, requires_grad=True)
    targets = torch.full((2, 3), IGNORE_INDEX)
    loss = triton_cross_entropy(logits, targets)
    loss.sum().backward()
    assert loss.shape == (2, 3) and torch.all(loss == 0) and torch.all(logits.grad == 0)


def test_cross_entropy_inplace_backward_reuses_the_logits_storage():
    logits = torch.randn(5, 64, requires_grad=True)
    work = logits * 1.0  # a non-leaf, as model logits are
    targets = torch.randint(0, 64, (5,))
    loss = triton_cross_entropy(work, targets, inplace_backward=True)
    (grad,) = torch.autograd.grad(loss.sum(), work)
    assert grad.data_ptr() == work.data_ptr()
    ref = torch.autograd.grad(reference_cross_entropy(logits, targets).sum(), logits)[0]
    torch.testing.assert_close(grad, ref)


# ---- fused linear + cross-entropy ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, hidden, vocab, chunk", [(37, 24, 50, 16), (8, 16, 33, 64)])
def test_fused_linear_cross_entropy_matches_reference(dtype, tokens, hidden, vocab, chunk):
    g = torch.Generator().manual_seed(tokens + vocab)
    h = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    t[::4] = IGNORE_INDEX
    ours, (gh, gw, _) = _grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_size=chunk), _leaf(h), _leaf(w), t)
    eager, (eh, ew, _) = _grads(reference_linear_cross_entropy, _leaf(h), _leaf(w), t)
    ref, (rh, rw, _) = _grads(reference_linear_cross_entropy, _leaf(h.float()), _leaf(w.float()), t)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, **TOL[dtype])
        torch.testing.assert_close(gh, rh, **TOL[dtype])
        torch.testing.assert_close(gw, rw, **TOL[dtype])
        return
    assert_as_accurate_as_eager(ours, eager, ref, "loss")
    assert_as_accurate_as_eager(gh, eh, rh, "grad hidden")
    assert_as_accurate_as_eager(gw, ew, rw, "grad weight")


def test_fused_linear_cross_entropy_with_frozen_weight_and_scaled_grad():
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(30, 16)
    t = torch.randint(0, 30, (10,))
    loss = fused_linear_cross_entropy(h, w, t, chunk_size=4)
    (loss * 0.5).backward()
    h_ref = h.detach().clone().requires_grad_()
    (reference_linear_cross_entropy(h_ref, w, t) * 0.5).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


# ---- fused MLP connector ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, d_in, d_hidden, d_out", [(37, 24, 40, 20), (16, 16, 16, 16)])
def test_fused_mlp_matches_reference(dtype, tokens, d_in, d_hidden, d_out):
    g = torch.Generator().manual_seed(tokens * d_in)
    x = torch.randn(2, tokens, d_in, generator=g).to(dtype)
    w1 = (torch.randn(d_hidden, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b1 = torch.randn(d_hidden, generator=g).to(dtype)
    w2 = (torch.randn(d_out, d_hidden, generator=g) / d_hidden ** 0.5).to(dtype)
    b2 = torch.randn(d_out, generator=g).to(dtype)
    gy = torch.randn(2, tokens, d_out, generator=g).to(dtype)
    ours, g_ours = _grads(fused_mlp, *[_leaf(t) for t in (x, w1, b1, w2, b2)], grad_out=gy)
    eager, g_eager = _grads(reference_mlp, *[_leaf(t) for t in (x, w1, b1, w2, b2)], grad_out=gy)
    ref, g_ref = _grads(reference_mlp, *[_leaf(t.float()) for t in (x, w1, b1, w2, b2)], grad_out=gy.float())
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, **TOL[dtype])
        for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), g_ours, g_ref):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")
        return
    assert_as_accurate_as_eager(ours, eager, ref, "output")
    for name, a, e, b in zip(("x", "w1", "b1", "w2", "b2"), g_ours, g_eager, g_ref):
        assert_as_accurate_as_eager(a, e, b, f"grad {name}")


# ---- pixel shuffle + LayerNorm --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, side, c", [(2, 4, 5), (1, 6, 8)])
def test_pixel_shuffle_norm_matches_reference(dtype, n, side, c):
    g = torch.Generator().manual_seed(side * c)
    x = torch.randn(n, side, side, c, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(4 * c, generator=g)).to(dtype)
    b = (0.1 * torch.randn(4 * c, generator=g)).to(dtype)
    gy = torch.randn(n, (side // 2) ** 2, 4 * c, generator=g).to(dtype)
    ours, g_ours = _grads(pixel_shuffle_norm, _leaf(x), _leaf(w), _leaf(b), grad_out=gy)
    eager, g_eager = _grads(reference_pixel_shuffle_norm, _leaf(x), _leaf(w), _leaf(b), grad_out=gy)
    ref, g_ref = _grads(reference_pixel_shuffle_norm, _leaf(x.float()), _leaf(w.float()), _leaf(b.float()),
                        grad_out=gy.float())
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, **TOL[dtype])
        for name, a, r in zip(("x", "weight", "bias"), g_ours, g_ref):
            torch.testing.assert_close(a, r, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")
        return
    assert_as_accurate_as_eager(ours, eager, ref, "output")
    for name, a, e, r in zip(("x", "weight", "bias"), g_ours, g_eager, g_ref):
        assert_as_accurate_as_eager(a, e, r, f"grad {name}")


def test_pixel_shuffle_order_is_internvl_v2():
    """Output token (i, j) holds ViT tokens (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) in that order."""
    from megavlm.kernels.pixel_shuffle_norm import reference_pixel_shuffle

    side, c = 4, 1
    x = torch.arange(side * side, dtype=torch.float32).view(1, side, side, c)
    out = reference_pixel_shuffle(x)
    assert out[0, 0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert out[0, 1, 0].tolist() == [8.0, 9.0, 12.0, 13.0]


# ---- TP=2 vs TP=1 for the vocab-parallel losses ---------------------------------------------------
@pytest.mark.multiproc
def test_vocab_parallel_losses_tp2_match_one_process(tmp_path):
    from tests.conftest import ROOT, run_torchrun
    from tests.workers import kernels_tp

    run_torchrun(ROOT / "tests" / "workers" / "kernels_tp.py", 2, [str(tmp_path / "tp2.pt")])
    got = torch.load(tmp_path / "tp2.pt")
    logits, targets, hidden, weight, grad_out = kernels_tp.inputs()
    ref, (ref_grad, _) = _grads(reference_cross_entropy, _leaf(logits), targets, grad_out=grad_out)
    torch.testing.assert_close(got["ce"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["ce_grad"], ref_grad, rtol=1e-5, atol=1e-6)
    total, (gh, gw, _) = _grads(reference_linear_cross_entropy, _leaf(hidden), _leaf(weight), targets)
    torch.testing.assert_close(got["flce"], total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["flce_grad_h"], gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["flce_grad_w"], gw, rtol=1e-5, atol=1e-6)
