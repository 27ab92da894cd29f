from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megavlm.config.model import LanguageConfig, ModelConfig, ParallelConfig, VisionConfig
from megavlm.config.schema import ConfigError, apply_overrides, from_dict, to_dict, with_overrides
from megavlm.models.registry import flavor_config


@dataclass
class Inner:
    rate: float = 1.0
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    count: int = 1
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    maybe: Optional[int] = None


def test_unknown_key_names_key_file_and_suggestion():
    with pytest.raises(ConfigError, match=r"'inner\.rte' in recipe\.yaml \(did you mean 'rate'\?\)"):
        from_dict(Outer, {"inner": {"rte": 2}}, source="recipe.yaml")


@pytest.mark.parametrize("data, key", [
    ({"count": "three"}, "count"),
    ({"count": True}, "count"),
    ({"inner": {"mode": "c"}}, "inner.mode"),
    ({"inner": {"rate": "fast"}}, "inner.rate"),
    ({"tags": "a"}, "tags"),
    ({"tags": [1]}, r"tags\[0\]"),
    ({"inner": 3}, "inner"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=rf"'{key}' in r\.yaml"):
        from_dict(Outer, data, source="r.yaml")


def test_values_convert():
    obj = from_dict(Outer, {"count": 2.0, "inner": {"rate": "1e-3"}, "maybe": None, "tags": ["t"]})
    assert obj.count == 2 and obj.inner.rate == 1e-3 and obj.maybe is None and obj.tags == ["t"]


def test_overrides_parse_yaml_values_and_validate():
    data = apply_overrides({"inner": {"rate": 1.0}}, ["inner.rate=0.5", "count=4", "name=hello"])
    assert from_dict(Outer, data) == Outer(name="hello", count=4, inner=Inner(rate=0.5))
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["count"])
    with pytest.raises(ConfigError, match="'inner.nope'"):
        from_dict(Outer, apply_overrides({}, ["inner.nope=1"]))


def test_model_config_round_trips_and_validates():
    cfg = flavor_config("llava", "llava-1b")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    assert with_overrides(cfg, ["language.num_layers=4"]).language.num_layers == 4
    with pytest.raises(ConfigError, match="'image_token_id'"):
        with_overrides(cfg, ["image_token_id=99999"])
    with pytest.raises(ConfigError, match="'language.num_kv_heads'"):
        LanguageConfig(num_heads=32, num_kv_heads=5)
    with pytest.raises(ConfigError, match="'vision.image_size'"):
        VisionConfig(image_size=10, patch_size=14)
    # a remainder is dropped by the patch convolution, as HF does: SigLIP-so400m's 384 px, 27 x 27 patches
    assert VisionConfig(image_size=384, patch_size=14).num_patches == 27 * 27
    with pytest.raises(ConfigError, match="'parallel.tensor_parallel'"):
        ParallelConfig(tensor_parallel=0)


def test_flavor_shapes():
    tiny = flavor_config("llava", "llava-1b")
    assert (tiny.language.hidden_size, tiny.language.num_layers, tiny.language.num_heads, tiny.language.num_kv_heads,
            tiny.language.ffn_hidden_size, tiny.language.vocab_size) == (2048, 22, 32, 4, 5632, 32064)
    assert (tiny.vision.image_size, tiny.vision.patch_size, tiny.vision.hidden_size, tiny.vision.num_layers) == (336, 14, 1024, 24)
    assert tiny.vision.layers_to_build == 23 and tiny.vision.tokens_per_image == 576
    big = flavor_config("llava", "llava-1.5-7b")
    assert (big.language.hidden_size, big.language.num_layers, big.language.query_groups) == (4096, 32, 32)
    debug = flavor_config("llava", "debug")
    assert debug.language.hidden_size == 64 and debug.language.num_layers == 2
    with pytest.raises(ValueError, match="unknown llava flavor"):
        flavor_config("llava", "nope")


@pytest.mark.parametrize("overrides, key", [
    (["train.seq_length=63"], "train.seq_length"),
    (["model.family=flamingo", "model.flavor=debug"], "parallel.sequence_parallel"),
])
def test_sequence_parallel_layout_errors_name_the_key(tmp_path, overrides, key):
    from megavlm.config.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {family: llava, flavor: debug}\nparallel: {tensor_parallel: 2, sequence_parallel: true}\n"
                      "train: {seq_length: 64}\n")
    load_recipe(recipe)  # the valid layout loads
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(recipe, overrides)
