"""torchrun worker (2 processes): generation from one dist checkpoint under TP=2 and then PP=2.

Each layout loads the checkpoint written by the single-process test, generates the same
prompts greedily and with seeded sampling, with and without the KV cache, and rank 0 writes
{layout: {mode: tokens}} as JSON for the test to compare with its TP=1 reference.
"""
import argparse
import json

import torch

from megavlm.config.model import ParallelConfig
from megavlm.eval.generate import SamplingConfig, generate
from megavlm.models.common.layer_specs import lm_head
from megavlm.parallel import init as pinit
from megavlm.training.build import build_model
from megavlm.training.checkpoint import load_model, read_model_config


class IdTokenizer:
    eos_id, pad_id = 2, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def run_layout(args, parallel: ParallelConfig, request: dict) -> dict:
    ctx = pinit.initialize(parallel, seed=0)
    cfg = read_model_config(args.ckpt)
    model = build_model(cfg, parallel, ctx, pinit.process_groups())
    load_model(model, args.ckpt)
    model.eval()
    head = lm_head(cfg, pinit.process_groups().tp, model.output_weight if ctx.is_last_stage else None)
    images = torch.load(request["images"])
    out = {}
    for mode, sampling in request["modes"].items():
        for cache in (True, False):
            result = generate([model], request["prompts"], images, request["images_per_sample"], head, IdTokenizer(),
                              SamplingConfig(**sampling, use_cache=cache), eos_ids={-1},
                              banned=[cfg.image_token_id])
            out[f"{mode}_{'cached' if cache else 'uncached'}"] = [g.tokens for g in result]
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    request = json.loads(open(args.request).read())
    results = {"tp2": run_layout(args, ParallelConfig(tensor_parallel=2), request),
               "pp2": run_layout(args, ParallelConfig(pipeline_parallel=2), request)}
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    pinit.destroy()


if __name__ == "__main__":
    main()
