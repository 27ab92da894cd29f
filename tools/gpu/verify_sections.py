"""The measurements of tools/gpu/verify_all.py, one function per table.

Each section runs in its own process (so one that overruns can be stopped without losing the
others, and no CUDA, compile or FP8 state leaks between them) and reports rows through ``emit``
as they finish. ``Plan`` holds the shapes: the real ones for the GPU, tiny ones for the CPU dry
run, which runs the same code and skips only what needs the GPU itself.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
THROUGHPUT_TOOL = ROOT / "tools" / "benchmark_throughput.py"
TE_MISSING = "Transformer Engine is not importable"   # layer_specs' error when TE is asked for and absent
# Known peer figures at llava-1b, batch 8 x 2048, 576 image tokens, on an H100 (tokens/s).
PEER_FIGURES = ["HF eager: stage 1 57.6k, stage 2 48.0k",
                "Transformer Engine layer stack alone: 70.3k bf16, 88.5k FP8"]
TARGET_VS_HF = {"bf16": 1.5, "fp8": 2.0}


@dataclass(frozen=True)
class Plan:
    dry: bool
    # correctness: LLaVA debug logits, GPU (bf16 / fp32) vs CPU fp32
    logits_batch: int = 2
    logits_seq: int = 96
    # throughput (tools/benchmark_throughput.py)
    flavor: str = "llava-1b"
    batch: int = 8
    seq: int = 2048
    steps: int = 5
    warmup: int = 2
    ours_overrides: tuple[str, ...] = ("kernels.cross_entropy=triton", "kernels.connector=triton")
    run_cap_s: float = 90.0          # one (peer, stage) process, compile excluded
    compile_cap_s: float = 180.0     # hf-compile (compilation included)
    # FP8 numerics
    fp8_flavor: str = "llava-1b"
    fp8_batch: int = 8               # ViT rows (577 x images) must be a multiple of 8 for FP8 GEMMs
    fp8_seq: int = 1024
    fp8_steps: int = 50
    # kernels
    kernel_reps: int = 5
    # data
    images: int = 2048
    pil_workers: int = 16
    dali_threads: int = 8
    dali_batch: int = 128
    image_size: int = 336
    # profile
    profile_steps: int = 2
    # HF + torch.compile (the kernels' compiled baselines always run: small graphs, seconds on a CPU);
    # a small CPU's inductor needs minutes for the HF model
    compile: bool = True

    @staticmethod
    def for_mode(dry: bool, compile_on_cpu: bool = False) -> "Plan":
        if not dry:
            return Plan(dry=False)
        return Plan(dry=True, compile=compile_on_cpu, flavor="debug", batch=2, seq=128, steps=1, warmup=1,
                    fp8_flavor="debug", fp8_batch=2, fp8_seq=64, fp8_steps=3, kernel_reps=1, images=24,
                    pil_workers=2, dali_threads=2, dali_batch=8, profile_steps=1, run_cap_s=240.0)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"


Emit = Callable[[dict], None]


def _left(deadline: float) -> float:
    return deadline - time.time()


def _init_single_process():
    from megavlm.config.model import ParallelConfig
    from megavlm.parallel import init as pinit

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    return pinit.initialize(ParallelConfig(), seed=0)


def te_status() -> tuple[bool, str]:
    try:
        import transformer_engine
        from megatron.core.extensions import transformer_engine as _mte  # noqa: F401
    except Exception as err:  # noqa: BLE001  (ImportError, or a build that does not match torch/CUDA)
        return False, f"{type(err).__name__}: {err}"
    return True, getattr(transformer_engine, "__version__", "?")


# ---- env --------------------------------------------------------------------------------------
def section_env(plan: Plan, emit: Emit, deadline: float) -> None:
    import torch
    from importlib import metadata

    row = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count)
    for dist in ("triton", "transformers", "megatron-core", "transformer-engine", "nvidia-dali-cuda130"):
        try:
            row[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            row[dist] = None
    ok, detail = te_status()
    row["te_importable"], row["te_detail"] = ok, detail
    try:
        import nvidia.dali  # noqa: F401
        row["dali_importable"] = True
    except Exception as err:  # noqa: BLE001
        row["dali_importable"] = f"{type(err).__name__}: {err}"
    from megavlm.training.flops import peak_flops

    peak = peak_flops(torch.device(plan.device))
    row["peak_bf16_tflops"] = peak / 1e12 if peak else None
    emit(row)


# ---- correctness ------------------------------------------------------------------------------
def cpu_reference(path: Path, batch: int, seq: int) -> None:
    """In a process that sees no GPU: LLaVA debug in fp32 on the CPU; weights, batch and logits to path."""
    import torch

    from megavlm.config.model import ParallelConfig
    from megavlm.data.synthetic import synthetic_batches
    from megavlm.models.registry import flavor_config
    from megavlm.parallel.init import process_groups
    from megavlm.training.build import build_model

    assert not torch.cuda.is_available(), "the CPU reference must run with no GPU visible"
    ctx = _init_single_process()
    cfg = flavor_config("llava", "debug")
    model = build_model(cfg, ParallelConfig(), ctx, process_groups()).eval()
    data = synthetic_batches(cfg, batch, seq, micro_batch_size=batch, seed=7, image_pattern=(1,))[0]
    with torch.no_grad():
        logits = model(data["input_ids"], images=data["images"], images_per_sample=data["images_per_sample"])
    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    torch.save({"state": state, "batch": data, "logits": logits}, path)


def local_to_te_keys(state: dict) -> dict:
    """Local-spec state dict -> TE spec names: the pre-attention / pre-MLP norms live inside
    TE's fused LayerNorm+Linear modules."""
    from megavlm.models.common.layer_specs import _TE_COMPATIBLE_NORM_KEYS

    out = {}
    for key, value in state.items():
        for local, fused in _TE_COMPATIBLE_NORM_KEYS.items():
            if f".{local}" in key:
                key = key.replace(local, fused)
        out[key] = value
    return out


def _logits_row(ref: dict, impl: str, dtype, ctx, device) -> dict:
    import torch

    from megavlm.config.model import ParallelConfig
    from megavlm.config.schema import with_overrides
    from megavlm.models.registry import flavor_config
    from megavlm.parallel.init import process_groups
    from megavlm.training.build import build_model, load_local_state

    cfg = with_overrides(flavor_config("llava", "debug"), [f"transformer_impl={impl}"])
    model = build_model(cfg, ParallelConfig(), ctx, process_groups(), dtype=dtype).eval()
    state = ref["state"] if impl == "local" else local_to_te_keys(ref["state"])
    load_local_state(model, {k: v.to(dtype) for k, v in state.items()})
    data = {k: v.to(device) for k, v in ref["batch"].items()}
    with torch.no_grad():
        logits = model(data["input_ids"], images=data["images"].to(dtype),
                       images_per_sample=data["images_per_sample"]).float().cpu()
    want = ref["logits"].float()
    rel = ((logits - want).norm() / want.norm()).item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return {"check": f"llava debug {impl} {str(dtype).replace('torch.', '')} on {device} vs CPU fp32",
            "rel_err": rel, "max_abs_err": (logits - want).abs().max().item(),
            "top1_agree": (logits.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "tolerance": tol, "ok": bool(torch.isfinite(logits).all()) and rel <= tol}


def guarded(emit: Emit, base: dict, fn: Callable[[], object]):
    """fn(); on an exception, an error row (so one failing check does not hide the others)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        emit({**base, "error": f"{type(err).__name__}: {str(err)[:400]}"})
        return None


def _cpu_reference_in_child(plan: Plan, deadline: float) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cpu_reference.pt"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("verify_all.py")), "--cpu-reference",
                               str(path), "--logits-shape", f"{plan.logits_batch}x{plan.logits_seq}"],
                              env=env, capture_output=True, text=True, timeout=max(10.0, _left(deadline)))
        if proc.returncode:
            raise RuntimeError(f"CPU reference failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        return torch.load(path, weights_only=False)


def section_correctness(plan: Plan, emit: Emit, deadline: float) -> None:
    import torch

    import bench_kernels

    ref = guarded(emit, {"check": "llava debug CPU fp32 reference"}, lambda: _cpu_reference_in_child(plan, deadline))
    if ref is not None:
        ctx = _init_single_process()
        torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 row compares true fp32
        torch.backends.cudnn.allow_tf32 = False
        te_ok, te_detail = te_status()
        for impl, dtype in [("local", torch.float32), ("local", torch.bfloat16)] + ([("te", torch.bfloat16)] if te_ok else []):
            base = {"check": f"llava debug {impl} {str(dtype).replace('torch.', '')} vs CPU fp32"}
            row = guarded(emit, base, lambda: _logits_row(ref, impl, dtype, ctx, ctx.device))
            if row is not None:
                emit(row)
        if not te_ok:
            emit({"check": "llava debug te bf16 vs CPU fp32", "skipped": f"Transformer Engine not importable ({te_detail})"})
    shapes = bench_kernels.CPU_SHAPES if plan.dry else bench_kernels.GPU_SHAPES
    for op in bench_kernels.OPS:
        row = guarded(emit, {"check": f"triton {op} bf16 vs fp32 reference"},
                      lambda: bench_kernels.correctness_row(op, shapes, plan.device))
        if row is not None:
            row["check"] = f"triton {row.pop('kernel')} bf16 vs fp32 reference"
            emit(row)


# ---- throughput -------------------------------------------------------------------------------
def throughput_runs(plan: Plan) -> list[dict]:
    """(label, benchmark_throughput peer, overrides), in the order they are worth the time."""
    ours = list(plan.ours_overrides)
    te = ours + ["transformer_impl=te"]
    runs = [("ours bf16", "ours", ours, "bf16"), ("hf eager", "hf", [], None),
            ("ours fp8 delayed", "ours-fp8", ours, "fp8"),
            ("ours fp8 current", "ours", te + ["fp8=current"], "fp8"),
            ("hf compile", "hf-compile", [], None), ("ours bf16 te", "ours", te, "bf16")]
    out = []
    for stage in (1, 2):
        for label, peer, overrides, kind in runs:
            out.append({"label": label, "peer": peer, "stage": stage, "overrides": overrides, "kind": kind})
    # stage 1 and 2 of the same peer side by side, the cheapest and most telling first
    return sorted(out, key=lambda r: ([x[0] for x in runs].index(r["label"]), r["stage"]))


def _one_throughput(plan: Plan, run: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(THROUGHPUT_TOOL), "--flavor", plan.flavor, "--batch", str(plan.batch),
           "--seq", str(plan.seq), "--steps", str(plan.steps), "--warmup", str(plan.warmup),
           "--stages", str(run["stage"]), "--peers", run["peer"], "--json"]
    cmd += [f"--override={o}" for o in run["overrides"]]
    base = {"label": run["label"], "stage": run["stage"], "overrides": run["overrides"], "kind": run["kind"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**base, "skipped": f"time budget ({timeout:.0f} s) ran out"}
    if proc.returncode:
        return {**base, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    start = proc.stdout.find("[\n")   # the tool's --json list (indented); anything printed before it is not
    if start < 0:
        return {**base, "error": f"no JSON in the output: {proc.stdout[-300:]!r}"}
    (row,) = json.loads(proc.stdout[start:])
    if "error" in row:
        if TE_MISSING in row["error"]:
            return {**base, "skipped": "Transformer Engine not importable" + (" (no CPU build)" if plan.dry else "")}
        return {**base, "error": row["error"]}
    return {**row, **base}


def section_throughput(plan: Plan, emit: Emit, deadline: float) -> None:
    runs = throughput_runs(plan)
    if not plan.compile:
        runs = [r for r in runs if r["peer"] != "hf-compile"]
    for run in runs:
        cap = plan.compile_cap_s if run["peer"] == "hf-compile" else plan.run_cap_s
        left = _left(deadline)
        if left < 15:
            emit({"label": run["label"], "stage": run["stage"], "kind": run["kind"], "skipped": "time budget"})
            continue
        emit(_one_throughput(plan, run, min(cap, left - 5)))


def tokens_per_s(row: dict) -> float | None:
    """Real (non-padding) tokens/s where the tool reports them, else all tokens/s."""
    value = row.get("real_tokens_per_s", row.get("tokens_per_s"))
    return float(value) if value is not None else None


def add_ratios(rows: list[dict]) -> None:
    """Ratio to HF eager at the same stage, and the target met or missed."""
    hf = {r["stage"]: tokens_per_s(r) for r in rows if r.get("label") == "hf eager" and tokens_per_s(r)}
    for r in rows:
        tps = tokens_per_s(r)
        if tps is None or r["stage"] not in hf:
            continue
        r["vs_hf"] = tps / hf[r["stage"]]
        if r.get("kind") in TARGET_VS_HF and r["label"].startswith("ours"):
            r["target_vs_hf"] = TARGET_VS_HF[r["kind"]]
            r["met"] = r["vs_hf"] >= r["target_vs_hf"]


# ---- FP8 numerics -----------------------------------------------------------------------------
def _loss_curve(plan: Plan, overrides: list[str], init_state: dict | None, batches, dtype) -> tuple[list[float], dict]:
    import torch

    from megavlm.config.recipe import StageConfig
    from megavlm.config.schema import with_overrides
    from megavlm.models.registry import flavor_config
    from megavlm.training.bench import build_harness
    from megavlm.training.step import train_step

    cfg = with_overrides(flavor_config("llava", plan.fp8_flavor), overrides)
    stage = StageConfig(name="stage2", trainable=["connector", "llm"])
    h = build_harness(cfg, stage, plan.fp8_batch, plan.fp8_seq, dtype)
    if init_state is None:
        init_state = {k: v.detach().clone() for k, v in h.model.state_dict().items()
                      if torch.is_tensor(v) and not k.endswith("_extra_state")}
    else:
        h.model.load_state_dict(init_state, strict=False)
        h.optimizer.reload_model_params()   # the optimizer's fp32 master copy follows the loaded weights
    losses = []
    for micro_batch in batches:
        result = train_step([h.ddp], h.optimizer, [micro_batch], h.loss_fn, plan.fp8_seq, plan.fp8_batch)
        losses.append(result.losses["lm_loss"])
    del h
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return losses, init_state


def section_fp8(plan: Plan, emit: Emit, deadline: float) -> None:
    import torch

    from megavlm.data.synthetic import synthetic_batches
    from megavlm.models.registry import flavor_config

    ctx = _init_single_process()
    dtype = torch.float32 if plan.dry else torch.bfloat16
    cfg = flavor_config("llava", plan.fp8_flavor)
    batches = synthetic_batches(cfg, plan.fp8_steps * plan.fp8_batch, plan.fp8_seq, micro_batch_size=plan.fp8_batch,
                                seed=11, image_pattern=(1,), device=ctx.device)
    te_ok, te_detail = te_status()
    base_impl = ["transformer_impl=te"] if te_ok else []
    base, init = _loss_curve(plan, base_impl, None, batches, dtype)
    label = "bf16 (TE)" if te_ok else f"{str(dtype).replace('torch.', '')} (local)"
    emit({"run": label, "first_loss": base[0], "last_loss": base[-1], "steps": len(base), "losses": base})
    # The rerun reloads the saved initial weights into a fresh model without FP8: its difference
    # is the noise floor of the comparison (zero on a CPU, where it checks the reload itself).
    legs = [(f"fp8 {r}", [f"fp8={r}"]) for r in ("delayed", "current")] + [(f"{label} rerun from the saved init", [])]
    for name, extra in legs:
        if extra and not te_ok:
            emit({"run": name, "skipped": f"Transformer Engine not importable ({te_detail})"})
            continue
        if _left(deadline) < 15:
            emit({"run": name, "skipped": "time budget"})
            continue
        leg = guarded(emit, {"run": name}, lambda: _loss_curve(plan, base_impl + extra, init, batches, dtype))
        if leg is None:
            continue
        curve = leg[0]
        diffs = [abs(a - b) / abs(b) for a, b in zip(curve, base)]
        row = {"run": name, "first_loss": curve[0], "last_loss": curve[-1], "steps": len(curve),
               "max_rel_loss_diff": max(diffs), "step_of_max": diffs.index(max(diffs)) + 1,
               "finite": all(c == c and abs(c) != float("inf") for c in curve), "losses": curve}
        if plan.dry and not extra:
            row["ok"] = max(diffs) < 1e-5
            row["check"] = name
        emit(row)


# ---- kernels ----------------------------------------------------------------------------------
def section_kernels(plan: Plan, emit: Emit, deadline: float) -> None:
    import bench_kernels

    shapes = bench_kernels.CPU_SHAPES if plan.dry else bench_kernels.GPU_SHAPES
    for op in bench_kernels.TARGETS:
        if _left(deadline) < 10:
            emit({"op": op, "skipped": "time budget"})
            continue
        rows = guarded(emit, {"op": op, "impl": "all"},
                       lambda: bench_kernels.timing_rows(op, shapes, plan.device, plan.kernel_reps,
                                                         compile_baseline=True, deadline=deadline))
        for row in rows or []:
            emit(row)


# ---- data -------------------------------------------------------------------------------------
def _make_jpegs(args) -> list[str]:
    from benchmark_dataloader import make_jpegs

    count, folder, seed = args
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [str(p) for p in make_jpegs(count, Path(folder), seed=seed)]


def section_data(plan: Plan, emit: Emit, deadline: float) -> None:
    import multiprocessing

    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark_dataloader import dali_throughput, pil_throughput

    workers = plan.pil_workers
    with tempfile.TemporaryDirectory() as tmp:
        chunks = [(plan.images // workers + (i < plan.images % workers), f"{tmp}/w{i}", i) for i in range(workers)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            paths = [Path(p) for chunk in pool.map(_make_jpegs, chunks) for p in chunk]
        pil = pil_throughput(paths, plan.image_size, workers)
        emit({"decoder": f"PIL, {workers} processes", "images": len(paths), "images_per_s": pil})
        mode = "CPU pipeline" if plan.dry else "mixed (nvJPEG)"
        try:
            import nvidia.dali  # noqa: F401
        except Exception as err:  # noqa: BLE001
            emit({"decoder": f"DALI {mode}", "skipped": f"DALI not importable (not carried?): {type(err).__name__}"})
            return
        passes = []
        for _ in range(3):  # each pass builds its pipeline first (untimed), then decodes every image once
            if _left(deadline) < 5:
                break
            rate = guarded(emit, {"decoder": f"DALI {mode}"},
                           lambda: dali_throughput(paths, plan.image_size, plan.dali_threads, batch=plan.dali_batch))
            if rate is None:
                return
            passes.append(rate)
        if not passes:
            emit({"decoder": f"DALI {mode}", "skipped": "time budget"})
            return
        rate = statistics.median(passes)
        row = {"decoder": f"DALI {mode}, {plan.dali_threads} threads", "images": len(paths), "images_per_s": rate,
               "passes": passes, "vs_pil": rate / pil}
        if not plan.dry:
            row.update(target_vs_pil=3.0, met=rate / pil >= 3.0)
        emit(row)


# ---- profile ----------------------------------------------------------------------------------
CATEGORIES = [  # (category, substrings of kernel / op names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn_generated_fort_native_sdpa")),
    ("loss", ("cross_entropy", "_ce_", "log_softmax", "nll_loss", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor", "_foreach", "l2norm", "unscale")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "matmul",
              "wgmma", "_gemm_epilogue")),
    ("norm", ("layer_norm", "layernorm", "rms_norm", "rmsnorm", "_shuffle_norm")),
    ("data movement", ("copy", "memcpy", "memset", "cat", "index", "scatter", "gather", "transpose", "fill",
                       "contiguous", "nccl", "all_reduce", "reduce_scatter")),
    ("elementwise", ("elementwise", "vectorized", "gelu", "silu", "mul", "add", "reduce")),
]


def categorise(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def section_profile(plan: Plan, emit: Emit, deadline: float) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megavlm.config.recipe import StageConfig
    from megavlm.config.schema import with_overrides
    from megavlm.models.registry import flavor_config
    from megavlm.training.bench import build_harness, ours_step

    cuda = torch.cuda.is_available()
    cfg = with_overrides(flavor_config("llava", plan.flavor), list(plan.ours_overrides))
    h = build_harness(cfg, StageConfig(name="stage2", trainable=["connector", "llm"]), plan.batch, plan.seq,
                      torch.bfloat16 if cuda else torch.float32)
    step = ours_step(h)
    for _ in range(plan.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(plan.profile_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    for event in prof.key_averages():
        if cuda:
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        else:
            us = event.self_cpu_time_total if event.key.startswith("aten::") else 0.0
        if us <= 0:
            continue
        totals[categorise(event.key)] = totals.get(categorise(event.key), 0.0) + us
        top.append((us, event.key))
    whole = sum(totals.values()) or 1.0
    for category, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        emit({"category": category, "ms_per_step": us / 1000 / plan.profile_steps, "share": us / whole})
    for us, name in sorted(top, reverse=True)[:8]:
        emit({"top_kernel": name[:90], "ms_per_step": us / 1000 / plan.profile_steps, "share": us / whole,
              "category": categorise(name)})


SECTIONS: dict[str, Callable[[Plan, Emit, float], None]] = {
    "env": section_env, "correctness": section_correctness, "throughput": section_throughput, "fp8": section_fp8,
    "kernels": section_kernels, "data": section_data, "profile": section_profile,
}
