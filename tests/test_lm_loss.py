import pytest
import torch
import torch.nn.functional as F

from megavlm.losses.lm_loss import IGNORE_INDEX, masked_lm_loss, shift_labels, vocab_parallel_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_cross_entropy(dtype):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 50, (3, 7))
    ours = vocab_parallel_cross_entropy(logits, target, 50)
    ref = F.cross_entropy(logits.float().reshape(-1, 50), target.reshape(-1), reduction="none").view(3, 7)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(3, 7)
    (grad,) = torch.autograd.grad(ours, logits, g)
    (ref_grad,) = torch.autograd.grad(ref, logits, g)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_padding_columns_are_excluded():
    torch.manual_seed(1)
    logits = torch.randn(5, 48, requires_grad=True)  # 45 real tokens + 3 TP-padding columns
    target = torch.randint(0, 45, (5,))
    ours = vocab_parallel_cross_entropy(logits, target, vocab_size=45)
    ref = F.cross_entropy(logits[:, :45], target, reduction="none")
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    assert torch.all(logits.grad[:, 45:] == 0)


def test_masked_sum_and_count():
    torch.manual_seed(2)
    logits = torch.randn(2, 6, 20)
    labels = torch.randint(0, 20, (2, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # a sample with nothing supervised
    total, count = masked_lm_loss(logits, labels, 20)
    assert count == 3
    ref = F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(total, ref)


def test_shift_labels():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1]])
    assert shift_labels(ids, mask).tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX]]


@pytest.mark.parametrize("supervised", [0.1, 0.9], ids=["few-rows-gathered", "most-rows-masked"])
def test_logits_head_loss_and_gradient_equal_the_plain_masked_loss(supervised):
    from megavlm.losses.lm_loss import LogitsHead

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 77, generator=g, requires_grad=True)
    labels = torch.randint(0, 77, (3, 40), generator=g)
    labels[torch.rand(3, 40, generator=g) > supervised] = IGNORE_INDEX
    total, count = LogitsHead(77, None).loss(logits, labels)
    (grad,) = torch.autograd.grad(total, logits)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 77), labels.reshape(-1), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert int(count) == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(grad, ref_grad)
