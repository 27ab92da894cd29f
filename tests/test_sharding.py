import itertools

import pytest
import torch

from megavlm.models.common.sharding import ShardingPlan, fuse_qkv, split_qkv


def test_qkv_fusion_round_trip_and_layout():
    heads, groups, dim, hidden = 4, 2, 3, 5
    q, k, v = (torch.randn(n * dim, hidden) for n in (heads, groups, groups))
    fused = fuse_qkv(q, k, v, heads, groups)
    # group 0: q heads 0,1 then k0, v0
    assert torch.equal(fused[:2 * dim], q[:2 * dim]) and torch.equal(fused[2 * dim:3 * dim], k[:dim])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)))


def _full_state(layers=4, vocab=10):
    g = torch.Generator().manual_seed(0)
    full = {
        "vision.patch_embed.weight": torch.randn(4, 3, 2, 2, generator=g),
        "vision.encoder.layers.0.self_attention.linear_qkv.weight": torch.randn(12, 4, generator=g),
        "vision.encoder.layers.0.mlp.linear_fc1.weight": torch.randn(8, 4, generator=g),
        "vision.encoder.layers.0.mlp.linear_fc2.bias": torch.randn(4, generator=g),
        "connector.linear_fc1.weight": torch.randn(8, 4, generator=g),
        "connector.linear_fc2.weight": torch.randn(8, 8, generator=g),
        "language_model.embedding.word_embeddings.weight": torch.randn(vocab, 8, generator=g),
        "language_model.decoder.final_layernorm.weight": torch.randn(8, generator=g),
        "language_model.output_layer.weight": torch.randn(vocab, 8, generator=g),
    }
    for i in range(layers):
        full[f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.randn(16, 8, generator=g)
        full[f"language_model.decoder.layers.{i}.self_attention.linear_proj.weight"] = torch.randn(8, 8, generator=g)
    return full


@pytest.mark.parametrize("tp, pp", itertools.product([1, 2, 4], [1, 2, 4]))
def test_shard_unshard_round_trip(tp, pp):
    full = _full_state()
    plan = ShardingPlan(tp_size=tp, pp_size=pp, num_layers=4, vocab_size=10)
    shards = {(t, p): plan.shard(full, t, p) for t in range(tp) for p in range(pp)}
    merged = plan.unshard(shards)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)
    # vocab 10 is padded to a multiple of TP, each rank holding an equal slice
    assert shards[(0, 0)]["language_model.embedding.word_embeddings.weight"].shape[0] == -(-10 // tp)
    assert sum(len(s) for (t, _), s in shards.items() if t == 0) == len(full)


def test_gated_fc1_keeps_gate_and_up_halves_per_rank():
    full = _full_state()
    plan = ShardingPlan(tp_size=2, pp_size=1, num_layers=4, vocab_size=10)
    w = full["language_model.decoder.layers.0.mlp.linear_fc1.weight"]  # [gate(8); up(8)]
    local = plan.shard(full, 1, 0)["language_model.decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(local, torch.cat([w[4:8], w[12:16]]))
    vit = plan.shard(full, 1, 0)["vision.encoder.layers.0.mlp.linear_fc1.weight"]  # not gated
    assert torch.equal(vit, full["vision.encoder.layers.0.mlp.linear_fc1.weight"][4:])


def test_pipeline_placement_and_local_names():
    plan = ShardingPlan(tp_size=1, pp_size=2, num_layers=4, vocab_size=10)
    second = plan.shard(_full_state(), 0, 1)
    assert "language_model.decoder.layers.0.mlp.linear_fc1.weight" in second  # global layer 2
    assert "vision.patch_embed.weight" not in second and "language_model.output_layer.weight" in second
    with pytest.raises(ValueError, match="missing"):
        plan.unshard({(0, 0): {}})


def test_indivisible_shapes_are_named():
    plan = ShardingPlan(tp_size=4, pp_size=1, num_layers=1, vocab_size=10)
    with pytest.raises(ValueError, match="linear_fc1.weight.*not divisible by TP=4"):
        plan.split("language_model.decoder.layers.0.mlp.linear_fc1.weight", torch.zeros(12, 8), 0)
    with pytest.raises(ValueError, match="connector.linear_fc1.weight.*not divisible by TP=4"):
        plan.split("connector.linear_fc1.weight", torch.zeros(6, 8), 0)
