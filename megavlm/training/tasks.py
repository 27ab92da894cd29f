"""What a stage optimises and measures, by model head: next-token prediction through the LLM
(``lm``), BLIP-2's Q-Former objectives (``qformer``) or CLIP/SigLIP's contrastive objective
(``contrastive``). The trainer is the same for all."""
from __future__ import annotations

import torch

from megavlm.data.build import encoder_for, open_eval_source, tile_planner
from megavlm.data.examples import ExampleBuilder, TextExampleBuilder
from megavlm.models.common.layer_specs import lm_head
from megavlm.training.step import lm_loss_fn

DEFAULT_QFORMER_WEIGHTS = {"itc": 1.0, "itm": 1.0, "itg": 1.0}


class LMTask:
    collate = "lm"

    def __init__(self, recipe, tokenizer, model, pgs, ctx):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.head = lm_head(recipe.model, pgs.tp, model.output_weight if ctx.is_last_stage else None)
        self.clip_scorer = _clip_scorer(recipe.eval, pgs, ctx) if recipe.eval.clip_model else None

    def builder(self):
        r = self.recipe
        max_images = r.model.flamingo.max_media if r.model.flamingo is not None else None
        return ExampleBuilder(encoder_for(r.model, self.tokenizer, r.data.template, r.data.unrepresentable_text),
                              r.train.seq_length,
                              augment=r.data.augment, seed=r.train.seed, end_of_chunk=r.data.end_of_chunk,
                              max_images=max_images, tiler=tile_planner(r.model, r.data),
                              drop_images=r.data.drop_images)

    def loss_fn(self):
        return lm_loss_fn(self.head)

    def validate(self, eval_ctx, source) -> dict:
        from megavlm.eval.vlm_eval import validation_loss

        return validation_loss(eval_ctx, source, self.recipe.data.template, self.recipe.train.eval_samples)

    def evaluate(self, eval_ctx) -> dict:
        from megavlm.eval.vlm_eval import evaluate_vlm

        return evaluate_vlm(eval_ctx, self.recipe.eval, self.recipe.data.template, self.clip_scorer)


def _clip_scorer(eval_cfg, pgs, ctx):
    """The CLIP model eval.clip_model names, loaded now so that a bad path stops the run at once."""
    from megavlm.config.schema import ConfigError
    from megavlm.eval.clip_score import ClipScorer

    try:
        return ClipScorer.load(eval_cfg.clip_model, pgs, ctx.device, eval_cfg.clip_tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"bad value for 'eval.clip_model': {err}") from None


class QFormerTask:
    """BLIP-2 stage 1: loss = sum of lambda_k * mean objective k; retrieval metrics."""

    collate = "text"

    def __init__(self, recipe, tokenizer, model, pgs, ctx):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.weights = dict(recipe.stage.loss_weights or DEFAULT_QFORMER_WEIGHTS)
        unknown = set(self.weights) - set(DEFAULT_QFORMER_WEIGHTS)
        if unknown:
            from megavlm.config.schema import ConfigError

            raise ConfigError(f"bad value for 'stage.loss_weights': unknown objective(s) {sorted(unknown)}; "
                              f"known: itc, itm, itg")

    def builder(self):
        r = self.recipe
        return TextExampleBuilder(self.tokenizer, r.train.seq_length, augment=r.data.augment, seed=r.train.seed)

    def loss_fn(self):
        weights = self.weights

        def loss(output: dict, batch: dict):
            samples = batch["text_ids"].shape[0]
            total = sum(w * output[k][0] / max(output[k][1], 1) for k, w in weights.items() if w)
            reports = {k: torch.stack([(v[0] / max(v[1], 1)).detach().float() * samples,
                                       torch.tensor(float(samples), device=v[0].device)])
                       for k, v in output.items()}
            reports["loss"] = torch.stack([total.detach().float() * samples, reports["itc"][1]])
            return total * samples, torch.tensor(samples, dtype=torch.int, device=total.device), reports

        return loss

    def validate(self, eval_ctx, source) -> dict:
        from megavlm.eval.retrieval import qformer_validation_loss

        return qformer_validation_loss(eval_ctx, source, self.loss_fn(), self.recipe.train.eval_samples)

    def evaluate(self, eval_ctx) -> dict:
        from megavlm.eval.retrieval import retrieval_metrics

        if not self.recipe.eval.captions:
            return {}
        source = open_eval_source(self.recipe.eval.captions, "captions", None, "eval.captions")
        return retrieval_metrics(eval_ctx, source, self.recipe.eval.max_samples, self.recipe.eval.rerank_top_k)


class ContrastiveTask:
    """CLIP / SigLIP pre-training: the objective's mean over the global batch (a sample's
    negatives: its micro-batch on every data-parallel rank); zero-shot retrieval and CLIP
    similarity metrics."""

    collate = "text"
    runs_every_micro_batch = True   # each forward gathers its micro-batch over the data-parallel ranks

    def __init__(self, recipe, tokenizer, model, pgs, ctx):
        self.recipe, self.tokenizer, self.objective = recipe, tokenizer, model.objective

    def builder(self):
        r = self.recipe
        return TextExampleBuilder(self.tokenizer, r.train.seq_length, augment=r.data.augment, seed=r.train.seed)

    def loss_fn(self):
        objective = self.objective

        def loss(output: dict, batch: dict):
            (name, (total, _)), = output.items()
            samples = torch.tensor(float(batch["text_ids"].shape[0]), device=total.device)
            report = torch.stack([total.detach().float(), samples])
            scale = objective.scale().detach().float().reshape(())
            return total, samples.int(), {name: report, "loss": report, "logit_scale": torch.stack([scale * samples,
                                                                                                   samples])}

        return loss

    def validate(self, eval_ctx, source) -> dict:
        from megavlm.eval.contrastive import contrastive_validation

        r = self.recipe
        return contrastive_validation(eval_ctx, source, r.train.eval_samples, r.train.global_batch_size)

    def evaluate(self, eval_ctx) -> dict:
        from megavlm.eval.contrastive import contrastive_metrics

        if not self.recipe.eval.captions:
            return {}
        source = open_eval_source(self.recipe.eval.captions, "captions", None, "eval.captions")
        return contrastive_metrics(eval_ctx, source, self.recipe.eval.max_samples)


TASKS = {"lm": LMTask, "qformer": QFormerTask, "contrastive": ContrastiveTask}


def make_task(recipe, tokenizer, model, pgs, ctx):
    return TASKS[recipe.model.head](recipe, tokenizer, model, pgs, ctx)
