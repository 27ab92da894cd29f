#!/usr/bin/env python
"""Ask a checkpoint about an image and print its answer (any TP/PP, under torchrun).

    python tools/generate.py --ckpt outputs/quickstart/stage3 --image a.jpg --prompt "What color is the square?"
    torchrun --nproc_per_node 2 tools/generate.py --ckpt ... --tp 2 --image a.jpg --prompt "..." \\
        --temperature 0.7 --top-p 0.9 --seed 1 --max-new-tokens 64 --stop "###"

The prompt goes through the chat template the checkpoint was trained with; --no-cache
recomputes the whole sequence per token (the reference the KV cache is tested against).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    parser.add_argument("--prompt", required=True, help="the question; <image> tags place images (default: first)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the saved recipe")
    args = parser.parse_args(argv)

    from pathlib import Path

    import torch

    from megavlm.data.build import encoder_for, image_backend
    from megavlm.data.collate import image_inputs
    from megavlm.data.templates import BadSample
    from megavlm.data.tokenizer import IMAGE_TOKEN
    from megavlm.data.augment import ImageAug
    from megavlm.eval.benchmark_runner import end_of_answer_ids
    from megavlm.eval.checkpoint_model import checkpoint_recipe, load_eval_model, parallel_from_args
    from megavlm.eval.generate import SamplingConfig, generate
    from megavlm.parallel import init as pinit

    for image in args.image:
        if not Path(image).is_file():
            print(f"error: --image {image} does not exist", file=sys.stderr)
            return 2
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), use_cache=not args.no_cache)
        recipe = checkpoint_recipe(args.ckpt, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ctx, pctx = load_eval_model(args.ckpt, recipe, parallel_from_args(args.tp, args.pp), micro_batch_size=1)
        question = args.prompt
        if args.image and IMAGE_TOKEN not in question:
            question = "\n".join([IMAGE_TOKEN] * len(args.image) + [question])
        encoder = encoder_for(ctx.model_cfg, ctx.tokenizer, recipe.data.template)
        items = [(Path(p).read_bytes(), ImageAug(), "prompt", p) for p in args.image]
        views = [1] * len(items)
        if ctx.tiler is not None:  # InternVL's tiles, Fuyu's patch grids: each image's layout from its size
            planned = [ctx.tiler.plan(data, aug, sid, src) for data, aug, sid, src in items]
            items = [(data, aug, sid, src) for (data, _, sid, src), (aug, _) in zip(items, planned)]
            views = [view for _, view in planned]
        prompt = encoder.encode_prompt([], question, len(args.image), "prompt", views)
        decoded = image_backend(ctx.model_cfg).decode(items)
        bad = next((d for d in decoded if isinstance(d, BadSample)), None)
        if bad is not None:
            raise bad
        inputs = [image_inputs(d) for d in decoded]
        images = torch.cat(inputs) if inputs else None
        start = time.perf_counter()
        out = generate(ctx.model_chunks, [prompt], images, [sum(i.shape[0] for i in inputs)], ctx.head, ctx.tokenizer,
                       sampling,
                       eos_ids=end_of_answer_ids(ctx.tokenizer, recipe.data.template),
                       banned=ctx.model_cfg.placeholder_ids)[0]
        seconds = time.perf_counter() - start
        if pctx.is_main:
            print(out.text)
            print(f"[{len(out.tokens)} tokens in {seconds:.2f} s, finished by {out.finish_reason}]", file=sys.stderr)
    except BadSample as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        pinit.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
