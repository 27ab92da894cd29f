#!/usr/bin/env python
"""Training throughput of megavlm vs HF transformers' LlavaForConditionalGeneration, same shape,
same card, side by side.

    python tools/benchmark_throughput.py [--flavor llava-1b] [--stages 1 2] [--batch 8] [--seq 2048]
        [--peers ours hf hf-compile ours-fp8 ours-fp8-current] [--override model.key=value ...]
        [--fill 1.0] [--steps 10] [--json] [--profile DIR]

Each (implementation, stage) runs in a fresh process on synthetic batches (one image per sample,
labels on the text after it; with ``--fill F`` each sample fills that share of its row and the
rest is padding). Stage 1 trains the connector; stage 2 the connector and the LLM; the ViT is
frozen in both. Peers: ``ours`` (bf16 on GPUs, fp32 on CPUs; the model config's kernels and
transformer_impl), ``ours-fp8`` / ``ours-fp8-current`` (Transformer Engine FP8, delayed /
current scaling; need TE), ``hf`` (eager, SDPA attention, fused AdamW, the same frozen set) and
``hf-compile`` (the same under torch.compile). Reported: tokens/s of real (non-padding) tokens,
the padding share of the rows, samples/s, median step time, achieved TFLOP/s and MFU from the
FLOPs of the real samples (megavlm/training/flops.py, formula printed), peak memory (CUDA
allocator peak; peak RSS growth on CPUs). ``--profile DIR`` also writes a torch.profiler table
of two steps per run to DIR.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

STAGES = {1: ["connector"], 2: ["connector", "llm"]}
FP8 = {"ours-fp8": "delayed", "ours-fp8-current": "current"}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_cfg(args):
    from megavlm.config.schema import with_overrides
    from megavlm.models.registry import flavor_config

    return with_overrides(flavor_config("llava", args.flavor), args.override)


def _ours(args, cfg, dtype, fp8: str | None):
    from megavlm.config.recipe import StageConfig
    from megavlm.config.schema import with_overrides
    from megavlm.training.bench import build_harness, ours_step

    if fp8:
        cfg = with_overrides(cfg, ["transformer_impl=te", f"fp8={fp8}"])
    h = build_harness(cfg, StageConfig(name=f"stage{args.stage}", trainable=STAGES[args.stage]), args.batch, args.seq,
                      dtype, fill=args.fill)
    return ours_step(h), h.batches


def _hf(args, cfg, dtype, compiled: bool):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from megavlm.data.synthetic import synthetic_batches
    from megavlm.losses.lm_loss import IGNORE_INDEX
    from megavlm.models.llava.state_dict_adapter import config_to_hf

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hf_config = LlavaConfig.from_dict(config_to_hf(cfg))
    hf_config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(hf_config).to(device=device, dtype=dtype).train()
    trainable = ("model.multi_modal_projector.",) + (("model.language_model.", "lm_head.") if args.stage == 2 else ())
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trainable))
    model.model.vision_tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    batches = synthetic_batches(cfg, args.batch, args.seq, micro_batch_size=args.batch, seed=0, image_pattern=(1,),
                                device=device, fill=args.fill)
    batch = batches[0]
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)   # HF shifts inside: unshift ours
    labels[:, 1:] = batch["labels"][:, :-1]
    forward = torch.compile(model) if compiled else model
    pixels = batch["images"].to(dtype)

    def step():
        loss = forward(input_ids=batch["input_ids"], pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batches


def run_one(args) -> dict:
    import torch

    from megavlm.training.accounting import count_step
    from megavlm.training.bench import median, time_steps
    from megavlm.training.flops import peak_flops

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = _model_cfg(args)
    start_rss = _rss_mib()
    if args.peer.startswith("ours"):
        step, batches = _ours(args, cfg, dtype, fp8=FP8.get(args.peer))
    else:
        step, batches = _hf(args, cfg, dtype, compiled=args.peer == "hf-compile")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, args.steps, warmup=args.warmup)
    seconds = median(times)
    if args.profile:
        _profile(step, args)
    counts = count_step(batches, cfg, set(STAGES[args.stage]))
    peak = peak_flops(torch.device("cuda" if cuda else "cpu"))
    return {"peer": args.peer, "stage": args.stage, "step_s": seconds,
            "tokens_per_s": counts.real_tokens / seconds, "real_tokens_per_s": counts.real_tokens / seconds,
            "row_tokens_per_s": counts.row_tokens / seconds, "padding_fraction": counts.padding_fraction,
            "samples_per_s": args.batch / seconds, "tflops": counts.flops / seconds / 1e12,
            "mfu": counts.flops / seconds / peak if peak else None,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mib() - start_rss,
            "device": torch.cuda.get_device_name() if cuda else "CPU", "dtype": str(dtype).replace("torch.", "")}


def _profile(step, args) -> None:
    """Two steps under torch.profiler; the table by self time goes to DIR/<peer>_stage<N>.txt."""
    from pathlib import Path

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        step()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30)
    (out / f"{args.peer}_stage{args.stage}.txt").write_text(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="llava-1b")
    parser.add_argument("--override", action="append", default=[], help="model config key=value")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=sorted(STAGES))
    parser.add_argument("--peers", nargs="+", default=None, choices=["ours", "ours-fp8", "ours-fp8-current", "hf",
                                                                     "hf-compile"],
                        help="default: ours, hf, hf-compile on GPUs (+ both FP8 peers when Transformer Engine imports)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fill", type=float, default=1.0, help="share of each row that is a real sample (rest padding)")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout instead of the table")
    parser.add_argument("--profile", default=None, help="write a torch.profiler table per run to this folder")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:  # child process: one run, JSON on the last line
        print(json.dumps(run_one(args)))
        return
    peers = args.peers or _default_peers()
    rows = []
    for stage in args.stages:
        for peer in peers:
            cmd = [sys.executable, __file__, "--peer", peer, "--stage", str(stage), "--flavor", args.flavor,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--fill", str(args.fill)] + [f"--override={o}" for o in args.override]
            if args.profile:
                cmd += ["--profile", args.profile]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                rows.append({"peer": peer, "stage": stage, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    _print_table(args, rows)


def _default_peers() -> list[str]:
    from megavlm.models.common.layer_specs import te_available

    import torch

    peers = ["ours", "hf"] + (["hf-compile"] if torch.cuda.is_available() else [])
    return peers + (list(FP8) if te_available() else [])


def _print_table(args, rows: list[dict]) -> None:
    from megavlm.training import flops

    ok = [r for r in rows if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    print(f"llava {args.flavor} {' '.join(args.override)}: batch {args.batch} x {args.seq} tokens, 1 image per sample, "
          f"rows {100 * args.fill:.0f}% filled, {device}, {ok[0]['dtype'] if ok else '?'}")
    print("FLOPs per sample (megavlm/training/flops.py):" + flops.__doc__.split("\n\n", 2)[2].rstrip())
    print("tokens/s: real (non-padding) tokens; MFU: FLOPs of the real samples / (step time x peak)")
    print(f"\n{'stage':>5} {'peer':<16} {'tokens/s':>10} {'padding':>8} {'samples/s':>9} {'step s':>8} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak MiB':>9} {'vs hf':>6}")
    for stage in args.stages:
        base = next((r for r in ok if r["stage"] == stage and r["peer"] == "hf"), None)
        for r in (r for r in rows if r["stage"] == stage):
            if "error" in r:
                print(f"{stage:>5} {r['peer']:<16} failed: {r['error']}")
                continue
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
            print(f"{stage:>5} {r['peer']:<16} {r['tokens_per_s']:>10.0f} {100 * r['padding_fraction']:>7.1f}% "
                  f"{r['samples_per_s']:>9.2f} {r['step_s']:>8.3f} {r['tflops']:>8.2f} {mfu:>6} {r['peak_mib']:>9.0f} "
                  f"{ratio:>6}")


if __name__ == "__main__":
    main()
