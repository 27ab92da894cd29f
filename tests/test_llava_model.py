import pytest
import torch

from megavlm.config.model import ParallelConfig
from megavlm.data.synthetic import synthetic_batches
from megavlm.losses.lm_loss import masked_lm_loss
from megavlm.models.common.image_tokens import ImageTokenMismatch
from megavlm.models.common.tags import parameters_by_component
from megavlm.models.registry import flavor_config
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model


@pytest.fixture(scope="module")
def debug_model(single_process):
    cfg = flavor_config("llava", "debug")
    return cfg, build_model(cfg, ParallelConfig(), single_process, process_groups())


def test_forward_backward_reaches_every_component(debug_model):
    cfg, model = debug_model
    batch = synthetic_batches(cfg, 4, 48, micro_batch_size=4, seed=1)[0]
    model.zero_grad()
    logits = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
    assert logits.shape == (4, 48, cfg.language.vocab_size)
    total, tokens = masked_lm_loss(logits, batch["labels"], cfg.language.vocab_size)
    (total / tokens).backward()
    assert torch.isfinite(total) and tokens == (batch["labels"] != -100).sum()
    groups = parameters_by_component(model)
    assert set(groups) == {"vision", "connector", "llm"}
    for component, params in groups.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params), component


def test_image_changes_only_positions_after_it(debug_model):
    cfg, model = debug_model
    batch = synthetic_batches(cfg, 1, 48, micro_batch_size=1, seed=2, image_pattern=(1,))[0]
    with torch.no_grad():
        a = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
        b = model(batch["input_ids"], images=torch.zeros_like(batch["images"]), images_per_sample=batch["images_per_sample"])
    first_image = int((batch["input_ids"][0] == cfg.image_token_id).nonzero()[0])
    assert torch.equal(a[:, :first_image], b[:, :first_image])  # causal: the prompt before the image
    assert (a[:, first_image:] - b[:, first_image:]).abs().max() > 1e-3


def test_text_only_batch_skips_the_vision_tower(debug_model):
    cfg, model = debug_model
    batch = synthetic_batches(cfg, 2, 32, micro_batch_size=2, seed=3, image_pattern=(0,))[0]
    assert batch["images"].shape[0] == 0
    with torch.no_grad():
        logits = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
        no_images = model(batch["input_ids"])
    assert torch.equal(logits, no_images)


def test_scatter_errors_name_sample_and_counts(debug_model):
    cfg, model = debug_model
    batch = synthetic_batches(cfg, 2, 48, micro_batch_size=2, seed=4, image_pattern=(1, 2))[0]
    ids, images, per_sample = batch["input_ids"], batch["images"], batch["images_per_sample"]
    tokens = cfg.vision.tokens_per_image
    with torch.no_grad():
        with pytest.raises(ImageTokenMismatch, match=rf"sample 1: {2 * tokens} <image> tokens in input_ids but 1 image\(s\) x {tokens} embeddings = {tokens}"):
            model(ids, images=images[:2], images_per_sample=torch.tensor([1, 1]))
        with pytest.raises(ImageTokenMismatch, match="carries 2 images but its samples ask for 3"):
            model(ids, images=images[:2], images_per_sample=per_sample)
        broken = ids.clone()
        broken[0, (broken[0] == cfg.image_token_id).nonzero()[0]] = 5  # one placeholder lost
        with pytest.raises(ImageTokenMismatch, match=rf"sample 0: {tokens - 1} <image> tokens"):
            model(broken, images=images, images_per_sample=per_sample)
        with pytest.raises(ImageTokenMismatch, match="not a multiple"):
            model(broken, images=images)
        with pytest.raises(ImageTokenMismatch, match="carries 0 images but its samples ask for 3"):
            model(ids)
        with pytest.raises(ImageTokenMismatch, match="images_per_sample has 3 entries for a batch of 2"):
            model(ids, images=images, images_per_sample=torch.tensor([1, 1, 1]))
        with pytest.raises(ValueError, match="the vision encoder expects"):
            model(ids, images=torch.zeros(3, 3, 28, 28), images_per_sample=per_sample)


def test_frozen_vision_runs_without_autograd(debug_model):
    cfg, model = debug_model
    batch = synthetic_batches(cfg, 1, 48, micro_batch_size=1, seed=5, image_pattern=(1,))[0]
    grad_modes = []
    hook = model.vision.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    try:
        model.image_embeddings(batch["images"])
        for p in model.vision.parameters():
            p.requires_grad_(False)
        embeds = model.image_embeddings(batch["images"])
        assert embeds.requires_grad  # the connector is still trainable
        assert grad_modes == [True, False]  # no activations stored for the frozen ViT
    finally:
        hook.remove()
        for p in model.vision.parameters():
            p.requires_grad_(True)
