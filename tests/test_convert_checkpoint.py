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
