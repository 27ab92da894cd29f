"""torchrun worker (2 processes): one training step of LLaVA (also with the fused linear
cross-entropy head), BLIP-2 (its decoder path, head lm) and InternVL debug models with everything trainable under TP=2 + sequence parallelism, from the
same full-form weights; rank 0 saves the loss and the gradients in full form. ``run`` is also
called in the test process for the one-process reference.

The ViTs have 17 tokens (16 patches + class token) for LLaVA/BLIP-2, so the padded-token path of
the ViT under sequence parallelism is exercised; InternVL's 16 divide evenly."""
import argparse
import os

import torch
from safetensors.torch import load_file

from megavlm.config.model import ParallelConfig
from megavlm.config.recipe import StageConfig
from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.common.layer_specs import lm_head
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel import init as pinit
from megavlm.parallel.gather import gather_shards, local_grads
from megavlm.training.build import build_model, wrap_ddp
from megavlm.training.stages import apply_stage
from megavlm.training.step import configure_schedule, forward_backward, lm_loss_fn

FAMILIES = {"llava": [], "blip2": ["head=lm"], "internvl": [], "llava_fused_ce": ["kernels.fused_linear_cross_entropy=true"]}
MICRO = 2


def model_config(family: str):
    return with_overrides(flavor_config(family.split("_")[0], "debug"), FAMILIES[family])


def seq_length(cfg) -> int:
    return 20 + 2 * cfg.image_tokens  # even: TP=2 splits it


def initial_weights(family: str) -> dict:
    """Full-form weights of a fresh TP=1 model (needs an initialised one-process world)."""
    cfg = model_config(family)
    ctx = pinit.initialize(ParallelConfig(), seed=5)
    model = build_model(cfg, ParallelConfig(), ctx, pinit.process_groups())
    with torch.no_grad():  # norms start at 1 and biases at 0: move them so a dropped gradient shows
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def run(family: str, parallel: ParallelConfig, full: dict, out: str) -> None:
    cfg = model_config(family)
    ctx = pinit.initialize(parallel, seed=0)
    pgs = pinit.process_groups()
    adapter = get_family(cfg.family).adapter_cls(cfg, tp_size=ctx.tp_size, pp_size=ctx.pp_size)
    model = build_model(cfg, parallel, ctx, pgs)
    missing, unexpected = model.load_state_dict(adapter.plan.shard(full, ctx.tp_rank, ctx.pp_rank), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")], (missing, unexpected)
    apply_stage(model, StageConfig(trainable=["vision", "connector", "llm"]))
    seq = seq_length(cfg)
    rows = _record_rows(model.language_model.decoder.layers[0], model.vision.encoder.layers[0])
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    ddp.zero_grad_buffer()
    batches = synthetic_batches(cfg, 4, seq, micro_batch_size=MICRO, seed=3, image_pattern=(1, 2, 0, 1))
    loss_fn = lm_loss_fn(lm_head(cfg, pgs.tp, model.output_weight))
    step = forward_backward([ddp], batches, loss_fn, seq, MICRO)
    grads = gather_shards(local_grads(model), ctx.tp_rank, ctx.pp_rank, ctx.dp_rank)
    split = ctx.tp_size if parallel.sequence_parallel else 1
    vit_tokens = -(-(cfg.vision.num_patches + int(cfg.vision.class_token)) // split)
    assert rows == {"llm": seq // split, "vit": vit_tokens}, (rows, seq, vit_tokens)
    if ctx.is_main:
        torch.save({"loss": step.losses["lm_loss"], "tokens": step.tokens, "grads": adapter.plan.unshard(grads)},
                   os.path.join(out, f"{family}.pt"))
    torch.distributed.barrier()


def _record_rows(llm_layer, vit_layer) -> dict:
    """Sequence rows each layer sees on this rank (the whole sequence / TP under SP)."""
    rows = {}
    for name, layer in (("llm", llm_layer), ("vit", vit_layer)):
        layer.register_forward_pre_hook(lambda _m, args, kwargs, n=name: rows.__setitem__(
            n, (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--init-dir", required=True, help="<family>.safetensors full-form weights")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for family in FAMILIES:
        full = load_file(os.path.join(args.init_dir, f"{family}.safetensors"))
        run(family, ParallelConfig(tensor_parallel=2, sequence_parallel=True), full, args.out)
    pinit.destroy()


if __name__ == "__main__":
    main()
