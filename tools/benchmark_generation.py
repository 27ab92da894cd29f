#!/usr/bin/env python
"""Generation speed with and without the KV cache: tokens/s over batches of image prompts of
different lengths on a model flavor with random weights (or a checkpoint), greedy decoding with
EOS disabled so every row generates --new-tokens.

    python tools/benchmark_generation.py --flavor debug --batch 1 8 --new-tokens 32
    torchrun --nproc_per_node 2 tools/benchmark_generation.py --tp 2 ...
"""
from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--ckpt", help="a megavlm checkpoint instead of random weights")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=24, help="text tokens after the image (+/- 25%%)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    import torch

    from megavlm.eval.checkpoint_model import parallel_from_args
    from megavlm.eval.generate import SamplingConfig, generate
    from megavlm.models.common.layer_specs import lm_head
    from megavlm.models.registry import flavor_config
    from megavlm.parallel import init as pinit
    from megavlm.training.build import build_model
    from megavlm.training.checkpoint import load_model, read_model_config

    parallel = parallel_from_args(args.tp, args.pp)
    ctx = pinit.initialize(parallel, seed=0)
    cfg = read_model_config(args.ckpt) if args.ckpt else flavor_config(args.family, args.flavor)
    model = build_model(cfg, parallel, ctx, pinit.process_groups())
    if args.ckpt:
        load_model(model, args.ckpt)
    model.eval()
    head = lm_head(cfg, pinit.process_groups().tp, model.output_weight if ctx.is_last_stage else None)

    class NoEOS:
        eos_id, pad_id = -1, 0

        def decode(self, ids):
            return ""

    rows = [("batch", "prompt tokens", "new tokens", "KV cache tok/s", "recompute tok/s", "speed-up")]
    g = torch.Generator().manual_seed(0)
    vocab = min(cfg.language.vocab_size, 30000)
    for batch in args.batch:
        lengths = [max(1, int(args.prompt_tokens * (0.75 + 0.5 * i / max(batch - 1, 1)))) for i in range(batch)]
        prompts = [[1] + [cfg.image_token_id] * cfg.image_tokens + torch.randint(4, vocab, (n,), generator=g).tolist()
                   for n in lengths]
        images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        speed = {}
        for cache in (True, False):
            sampling = SamplingConfig(max_new_tokens=args.new_tokens, use_cache=cache)
            generate([model], prompts[:1], images[:1], [1], head, NoEOS(), sampling, eos_ids=set(),
                     banned=[cfg.image_token_id])     # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                generate([model], prompts, images, [1] * batch, head, NoEOS(), sampling, eos_ids=set(),
                         banned=[cfg.image_token_id])
            speed[cache] = batch * args.new_tokens * args.repeats / (time.perf_counter() - start)
        prompt_len = f"{len(prompts[0])}-{len(prompts[-1])}"
        rows.append((str(batch), prompt_len, str(args.new_tokens), f"{speed[True]:.1f}", f"{speed[False]:.1f}",
                     f"{speed[True] / speed[False]:.2f}x"))
    if ctx.is_main:
        print(f"{args.family}/{args.flavor if not args.ckpt else args.ckpt}  TP={args.tp} PP={args.pp}  "
              f"device={ctx.device}")
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    pinit.destroy()


if __name__ == "__main__":
    main()
