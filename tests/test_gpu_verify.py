"""tools/gpu: the wheel carrier (pack -> stash -> join, sha256-checked) and the Python parts of
verify_all's dry run (kernel checks at tiny shapes, throughput rows, tables, failure rules)."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools" / "gpu"))

import bench_kernels  # noqa: E402
import carry  # noqa: E402
import verify_all  # noqa: E402
import verify_sections as vs  # noqa: E402


# ---- carrying wheels --------------------------------------------------------------------------
def test_plan_pieces_fills_calls_without_exceeding_limits():
    files = [("big.whl", 276), ("mid.whl", 28), ("a.whl", 3), ("b.whl", 1)]
    bins = carry.plan_pieces(files, part_bytes=50, call_bytes=60, min_piece=1)
    assert all(sum(n for _, _, n in b) <= 60 for b in bins)
    assert all(n <= 50 for b in bins for _, _, n in b)
    assert len(bins) == -(-308 // 60)                       # as few calls as the bytes allow
    for name, size in files:                                # each file covered once, in order
        pieces = [(off, n) for b in bins for f, off, n in b if f == name]
        assert [off for off, _ in pieces] == [sum(n for _, n in pieces[:i]) for i in range(len(pieces))]
        assert sum(n for _, n in pieces) == size
    with pytest.raises(ValueError, match="exceeds the per-call size"):
        carry.plan_pieces(files, part_bytes=70, call_bytes=60)


@pytest.fixture()
def packed(tmp_path):
    src = tmp_path / "dl"
    src.mkdir()
    blobs = {"megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl": bytes(range(256)) * 9,
             "transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl": bytes(reversed(range(256))) * 31,
             "nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl": b"dali" * 1500}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    groups = {"core": list(blobs)[:2], "dali": list(blobs)[2:]}
    checkout = tmp_path / "checkout"
    manifest = carry.pack(src, groups, checkout, checkout / "wheels", part_bytes=2000, call_bytes=3000)
    return manifest, checkout, blobs


def test_pack_stash_join_round_trip(packed, tmp_path):
    manifest, checkout, blobs = packed
    assert json.loads((checkout / "wheels" / carry.MANIFEST).read_text()) == manifest
    calls = manifest["calls"]
    core_folders = [f["folder"] for f in manifest["folders"] if f["group"] == "core"]
    assert calls[-1]["carry"] == ["wheels", core_folders[-1]] and "verify_all.sh 2>&1" in calls[-1]["command"]
    assert all("--stash-only" in c["command"] for c in calls[:-1])
    assert [c["optional"] for c in calls[:-1]] == sorted(c["optional"] for c in calls[:-1])  # core first
    carried = sorted(f for c in calls for f in c["carry"] if f != "wheels")
    assert carried == sorted(f["folder"] for f in manifest["folders"])
    parts = tmp_path / "parts"
    carry.stash(checkout, parts)
    assert carry.missing_pieces(manifest, parts) == {"core": [], "dali": []}
    joined = carry.join(manifest, parts, tmp_path / "joined", ["core", "dali"])
    assert {p.name: p.read_bytes() for p in joined} == blobs


def test_join_names_the_missing_or_corrupt_piece(packed, tmp_path):
    manifest, checkout, _ = packed
    parts = tmp_path / "parts"
    carry.stash(checkout, parts)
    piece = manifest["wheels"][1]["pieces"][1]
    (parts / piece["file"]).write_bytes(b"x" * piece["bytes"])
    with pytest.raises(carry.CarryError, match=rf"{piece['file']}: sha256/size differs .*{piece['folder']}"):
        carry.join(manifest, parts, tmp_path / "joined", ["core"])
    (parts / piece["file"]).unlink()
    assert carry.missing_pieces(manifest, parts)["core"] == [f"{piece['folder']}/{piece['file']}"]
    with pytest.raises(carry.CarryError, match=rf"missing \(carried in {piece['folder']}\)"):
        carry.join(manifest, parts, tmp_path / "joined", ["core"])


def test_wheel_names_and_versions():
    name = "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
    assert (carry.wheel_name(name), carry.wheel_version(name)) == ("pydantic-core", "2.50.5")
    assert carry._version_tuple("4.16.0") > carry._version_tuple("4.15.0")
    assert carry._version_tuple("2.11.0+cu130") >= carry._version_tuple("2.11.0")


# ---- verify_all -------------------------------------------------------------------------------
def test_triton_kernels_correctness_rows_at_dry_run_shapes():
    rows = bench_kernels.correctness_rows(bench_kernels.CPU_SHAPES, "cpu")
    assert [r["kernel"] for r in rows] == ["cross-entropy", "linear+cross-entropy", "connector", "pixel-shuffle+norm"]
    for r in rows:
        assert r["ok"], r
        assert 0 <= r["grad_rel_err"] < 2e-2 and r["eager_grad_rel_err"] > 0, r   # bf16 differs from fp32


def test_throughput_runs_cover_the_issue_table():
    runs = vs.throughput_runs(vs.Plan.for_mode(dry=False))
    labels = {r["label"] for r in runs}
    assert {"ours bf16", "ours fp8 delayed", "ours fp8 current", "hf eager", "hf compile"} <= labels
    assert {(r["label"], r["stage"]) for r in runs} == {(l, s) for l in labels for s in (1, 2)}
    current = next(r for r in runs if r["label"] == "ours fp8 current")
    assert "transformer_impl=te" in current["overrides"] and "fp8=current" in current["overrides"]
    assert runs[0]["label"] == "ours bf16" and runs[2]["label"] == "hf eager"


def test_ratios_prefer_real_tokens_and_judge_targets():
    rows = [{"label": "hf eager", "stage": 1, "tokens_per_s": 1000.0, "real_tokens_per_s": 800.0},
            {"label": "ours bf16", "stage": 1, "kind": "bf16", "tokens_per_s": 1500.0, "real_tokens_per_s": 1300.0,
             "padding_fraction": 0.1},
            {"label": "ours fp8 delayed", "stage": 1, "kind": "fp8", "tokens_per_s": 1500.0},
            {"label": "ours bf16", "stage": 2, "kind": "bf16", "skipped": "time budget"}]
    vs.add_ratios(rows)
    assert rows[1]["vs_hf"] == pytest.approx(1300 / 800) and rows[1]["met"] is True
    assert rows[2]["vs_hf"] == pytest.approx(1500 / 800) and rows[2]["met"] is False
    assert "vs_hf" not in rows[0] or "met" not in rows[0]
    assert "vs_hf" not in rows[3]


def _results(mode, rows):
    return {"date": "2026-01-01", "device": "NVIDIA H200", "mode": mode, "elapsed_s": 1.0, "budget_s": 450,
            "sections": {"throughput": {"status": "ok", "elapsed_s": 1.0, "allowed_s": 2.0, "rows": rows,
                                        "log_tail": ""}}}


def test_tables_and_failure_rules(tmp_path):
    rows = [{"label": "ours bf16", "stage": 1, "tokens_per_s": 10.0, "mfu": 0.4, "peak_mib": 5.0, "step_s": 1.0,
             "some_new_key": 3},
            {"label": "ours fp8 delayed", "stage": 1, "skipped": "Transformer Engine not importable (no CPU build)"}]
    text = "\n".join(verify_all.table_lines("throughput", _results("gpu", rows)["sections"]["throughput"], True))
    assert "| ours bf16 | 1 | 10 |" in text and "ours fp8 delayed stage 1: skipped: Transformer Engine" in text
    assert verify_all.problems(_results("cpu-dry-run", rows)) == []
    assert verify_all.problems(_results("cpu-dry-run", rows + [{"label": "hf eager", "stage": 1,
                                                                 "skipped": "time budget"}]))
    assert verify_all.problems(_results("gpu", rows + [{"label": "hf eager", "stage": 2, "error": "CUDA OOM"}]))
    paths = verify_all.write_results(_results("gpu", rows), tmp_path, None)
    assert [p.name for p in paths] == ["2026-01-01-nvidia-h200.json", "2026-01-01-nvidia-h200.md"]
    assert "Reference figures" in paths[1].read_text()


def test_local_norm_keys_map_to_te_fused_names():
    state = {"language_model.decoder.layers.0.input_layernorm.weight": 1,
             "language_model.decoder.layers.0.pre_mlp_layernorm.bias": 2,
             "language_model.decoder.final_layernorm.weight": 3}
    assert vs.local_to_te_keys(state) == {
        "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": 1,
        "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_bias": 2,
        "language_model.decoder.final_layernorm.weight": 3}


def test_profile_categories():
    assert vs.categorise("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert vs.categorise("flash_fwd_kernel") == "attention"
    assert vs.categorise("_ce_forward_stats") == "loss"
    assert vs.categorise("multi_tensor_apply_kernel<AdamFunctor>") == "optimizer"
    assert vs.categorise("void at::native::vectorized_elementwise_kernel<4, CopyFunctor>") == "data movement"
