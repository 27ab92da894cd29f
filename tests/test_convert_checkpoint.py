"""tools/convert_checkpoint.py end to end: HF dir -> megavlm checkpoint -> HF dir, with --verify."""
import subprocess
import sys

import torch
from safetensors.torch import load_file

from megavlm.models.registry import flavor_config
from tests.conftest import ROOT, tiny_hf_llava

TOOL = ROOT / "tools" / "convert_checkpoint.py"


def _run(*args):
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def test_round_trip_through_the_cli(tmp_path):
    hf = tiny_hf_llava(flavor_config("llava", "debug"), seed=11)
    hf.save_pretrained(tmp_path / "hf")  # transformers writes its on-disk (legacy) tensor names
    out = _run("hf-to-megavlm", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--verify")
    assert "verify: max |logits(HF) - logits(megavlm)|" in out and "OK" in out
    assert "HF tensors the model never uses were left out" in out
    out = _run("megavlm-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"),
               "--hf-reference", str(tmp_path / "hf"), "--verify")
    assert "OK" in out
    original, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    state = {k: v for k, v in hf.state_dict().items()}
    assert len(back) == len(original) == len(state)
    assert all(torch.equal(back[k], state[k]) for k in back)
    # without the reference, the exported ViT is cut to the layers LLaVA reads, still exact
    out = _run("megavlm-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "compact"), "--verify")
    assert "OK" in out


def test_missing_directory_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "hf-to-megavlm", "--hf", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "config.json does not exist" in proc.stderr


def test_sharded_bf16_internvl_without_qkv_bias_round_trips_through_the_cli(tmp_path):
    """A bias-free InternViT (HF's default attention_bias: false) saved as bf16 in several shards
    with model.safetensors.index.json: converted in fp32 (each tensor cast as it is read) and back,
    both with --verify."""
    from megavlm.models.common.hf_io import write_hf_dir
    from megavlm.models.registry import get_family
    from tests import hf_variants

    cfg = hf_variants.variant_config("internvl-qkv-bias-free")
    hf = hf_variants.hf_reference(cfg, seed=2)
    config = dict(get_family("internvl").config_to_hf(cfg), torch_dtype="bfloat16")
    state = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    write_hf_dir(tmp_path / "hf", config, state, max_shard_bytes=200_000)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    out = _run("hf-to-megavlm", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--verify")
    assert "OK" in out
    out = _run("megavlm-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--verify")
    assert "OK" in out
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert not any(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and "vision_tower" in k for k in back)
    assert all(torch.equal(back[k], state[k].float()) for k in back)


def test_lazy_reading_casts_each_tensor_and_checks_the_index(tmp_path):
    import json

    import pytest

    from megavlm.models.common.hf_io import read_hf_dir, write_hf_dir

    state = {f"layer.{i}.weight": torch.randn(64, 64, dtype=torch.bfloat16) for i in range(5)}
    write_hf_dir(tmp_path, {"model_type": "x"}, state, max_shard_bytes=3 * 64 * 64 * 2)
    _, lazy = read_hf_dir(tmp_path, torch.float32)
    assert sorted(lazy) == sorted(state) and len(lazy) == 5
    assert all(lazy[k].dtype == torch.float32 and torch.equal(lazy[k], v.float()) for k, v in state.items())
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())
    weight_map["weight_map"]["layer.0.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(weight_map))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009.safetensors"):
        read_hf_dir(tmp_path)


def test_pad_heads_for_tp_pads_every_vision_side_attention_and_strips_on_export(tmp_path):
    """A BLIP-2 whose ViT and Q-Former have 5 heads: --pad-heads-for-tp 2 pads both to 6 (the
    checkpoint's config says so, so it trains at TP=2), logits unchanged (--verify both ways), and
    the export is the input checkpoint exactly."""
    from megavlm.config.schema import with_overrides
    from megavlm.models.common.hf_io import write_hf_dir
    from megavlm.models.registry import get_family
    from tests import hf_variants

    cfg = with_overrides(flavor_config("blip2", "debug"), ["vision.hidden_size=80", "vision.num_heads=5",
                                                            "qformer.hidden_size=80", "qformer.num_heads=5"])
    hf = hf_variants.hf_reference(cfg, seed=4)
    state = dict(hf.state_dict())
    write_hf_dir(tmp_path / "hf", get_family("blip2").config_to_hf(cfg), state)
    out = _run("hf-to-megavlm", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
               "--pad-heads-for-tp", "2", "--verify")
    assert "vision.padded_heads=6, qformer.padded_heads=6" in out and "OK" in out
    from megavlm.training.checkpoint import read_model_config

    saved = read_model_config(tmp_path / "ckpt")
    assert saved.vision.built_heads == 6 and saved.qformer.built_heads == 6
    out = _run("megavlm-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--verify")
    assert "OK" in out
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(state) - set(back) <= {"language_model.lm_head.weight"}  # tied to the embedding: not saved
    assert not hf_variants.export_mismatches(back, state)
