"""The training loop of one stage: build from a recipe, train, evaluate, checkpoint, resume."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megavlm.config.recipe import Recipe, dump_recipe
from megavlm.config.schema import ConfigError
from megavlm.data import embedded
from megavlm.data.build import build_step_loader, open_eval_source, tile_planner
from megavlm.data.loader import SKIP_REASONS, SkipCounter
from megavlm.data.sampler import SamplerState
from megavlm.data.templates import TemplateMismatch
from megavlm.data.tokenizer import load_tokenizer
from megavlm.eval.vlm_eval import EvalContext
from megavlm.losses.lm_loss import IGNORE_INDEX
from megavlm.models.common.hf_io import read_hf_dir
from megavlm.models.registry import get_family
from megavlm.parallel import init as pinit
from megavlm.training.build import build_model, ddp_config, load_local_state, params_in_sync, wrap_ddp
from megavlm.training.checkpoint import CheckpointManager, load_components, load_model
from megavlm.training.accounting import StepCounts, count_step
from megavlm.training.flops import peak_flops
from megavlm.training.logging import MetricsLogger, format_metrics  # noqa: F401 (format_metrics: re-exported)
from megavlm.training.resilience import RunStop, StopRequest, agree_on_error, flags
from megavlm.training.stages import apply_stage, megatron_optimizer_config, optimizer_groups, set_train_mode
from megavlm.training.step import configure_schedule, train_step
from megavlm.training.tasks import make_task

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    def __init__(self, recipe: Recipe, resume: bool = False):
        self.recipe = recipe
        self.ctx = pinit.initialize(recipe.parallel, seed=recipe.train.seed)
        self.pgs = pinit.process_groups()
        self.dtype = DTYPES[recipe.train.dtype]
        self.tokenizer = self._tokenizer()
        self.model = self._build_model()
        self.ddp = wrap_ddp(self.model, ddp_config(recipe.train, recipe.optimizer, self.ctx.device))
        configure_schedule([self.ddp])
        self.task = make_task(recipe, self.tokenizer, self.model, self.pgs, self.ctx)
        self.train_set, self.sampler, self.loader = build_step_loader(recipe, self.tokenizer, self.task.builder(),
                                                                      self.task.collate, self.ctx.dp_rank,
                                                                      self.ctx.dp_size, self.ctx.device.index)
        self.benchmarks = self._load_benchmarks()
        self.val_set = (open_eval_source(recipe.data.validation, recipe.data.format, recipe.data.root, "data.validation")
                        if recipe.data.validation else None)
        self.total_steps = recipe.train.max_steps or max(1, int(recipe.train.epochs * self.sampler.steps_per_epoch))
        self.optimizer, self.scheduler = self._build_optimizer()
        self.skips = SkipCounter(recipe.data.max_skip_fraction, recipe.data.min_skip_budget,
                                 kept_reasons={"unrepresentable_text"} if recipe.data.unrepresentable_text == "train" else ())
        self.ckpt = CheckpointManager(recipe.checkpoint, recipe.model, dump_recipe(recipe)) if recipe.checkpoint.dir else None
        self.step, self.metrics, self.finished = 0, {}, False
        self.metrics_step = None                   # the step self.metrics were measured at
        self.faults = {"empty_steps": 0, "bad_steps": 0}
        self.bad_in_a_row = 0
        if resume:
            self._resume()

    # ---- construction ----------------------------------------------------------------------
    def _tokenizer(self):
        data, model = self.recipe.data, self.recipe.model
        if data.embedded:
            if self.ctx.is_main:
                embedded.ensure(data.embedded)
            dist.barrier()
        if not data.tokenizer:
            raise ConfigError("missing key 'data.tokenizer' in the recipe")
        contrastive = model.head == "contrastive"   # a text encoder: no <image> token
        tok = load_tokenizer(data.tokenizer, data.added_tokens, data.image_piece, require_image_token=not contrastive)
        if not contrastive and tok.image_token_id != model.image_token_id:
            raise ConfigError(f"bad value for 'model.image_token_id': {model.image_token_id}, but the tokenizer "
                              f"{data.tokenizer} maps {data.image_piece or '<image>'} to {tok.image_token_id}")
        if tok.vocab_size > model.language.vocab_size:
            raise ConfigError(f"bad value for 'model.language.vocab_size': {model.language.vocab_size} is smaller "
                              f"than the tokenizer's {tok.vocab_size} pieces ({data.tokenizer})")
        return tok

    def _build_model(self):
        r = self.recipe
        model = build_model(r.model, r.parallel, self.ctx, self.pgs, dtype=self.dtype, recompute=r.train.recompute)
        if r.stage.init_from:
            load_model(model, r.stage.init_from, partial=True)
        for component, path in r.stage.init_components_from.items():
            load_components(model, path, component, f"stage.init_components_from.{component}")
        if r.stage.init_from_hf or r.stage.init_components_from_hf:
            self._load_hf(model)
        self.trainable = apply_stage(model, r.stage)
        return model

    def _load_hf(self, model) -> None:
        r = self.recipe
        adapter = get_family(r.model.family).adapter_cls(r.model, self.ctx.tp_size, self.ctx.pp_size,
                                                         r.parallel.first_stage_layers, r.parallel.last_stage_layers)
        if r.stage.init_from_hf:
            local = adapter.hf_to_megavlm(read_hf_dir(r.stage.init_from_hf)[1], self.ctx.tp_rank, self.ctx.pp_rank)
            load_local_state(model, {k: v.to(self.dtype) for k, v in local.items()})
            return
        sources = {c: read_hf_dir(path)[1] for c, path in r.stage.init_components_from_hf.items()}
        local = adapter.components_to_megavlm(sources, self.ctx.tp_rank, self.ctx.pp_rank)
        own = model.state_dict()
        for key, tensor in local.items():
            if own[key].shape != tensor.shape:
                raise ConfigError(f"stage.init_components_from_hf: {key} has shape {tuple(tensor.shape)} in the HF "
                                  f"checkpoint but {tuple(own[key].shape)} in the model: check model.* against it")
        model.load_state_dict({k: v.to(self.dtype) for k, v in local.items()}, strict=False)

    def _load_benchmarks(self) -> list:
        """eval.benchmarks, read now so that a bad file fails before training does."""
        from megavlm.eval.benchmark_runner import load_benchmarks
        from megavlm.eval.benchmarks import BenchmarkError

        try:
            loaded = load_benchmarks(self.recipe.eval.benchmarks)
        except BenchmarkError as err:
            raise ConfigError(f"eval.benchmarks: {err}") from None
        wanted = "generate" if self.recipe.model.head == "lm" else "retrieval"
        for lb in loaded:
            if lb.benchmark.kind != wanted:
                needs = "generates answers" if lb.benchmark.kind == "generate" else "scores image-text pairs (ITC, CLIP)"
                raise ConfigError(f"eval.benchmarks: {lb.benchmark.name} needs a model that {needs}; this stage's "
                                  f"head is {self.recipe.model.head!r}")
        return loaded

    def _run_benchmarks(self, logger: MetricsLogger) -> dict[str, float]:
        from megavlm.eval.benchmark_runner import flat_metrics, format_table, run_benchmarks, write_results

        r = self.recipe
        results = run_benchmarks(self._eval_context(), self.benchmarks, r.data.template, self.ctx.dp_rank,
                                 self.ctx.dp_size, parallel_state.get_data_parallel_group(),
                                 r.eval.blank_image_baseline, show_progress=self.ctx.is_main and r.logging.progress)
        if self.ctx.is_main:
            if r.checkpoint.dir:
                write_results(results, Path(r.checkpoint.dir) / "eval", {"step": self.step, "stage": r.stage.name})
            logger.print(format_table(results))
        return {f"bench/{k}": v for k, v in flat_metrics(results).items()}

    def _build_optimizer(self):
        opt = self.recipe.optimizer
        config = megatron_optimizer_config(opt, self.dtype)
        optimizer = get_megatron_optimizer(config, [self.ddp], config_overrides=optimizer_groups(
            self.recipe.stage, opt, config, self.recipe.model.vision_layers))
        warmup = opt.warmup_steps if opt.warmup_steps is not None else round((opt.warmup_ratio or 0.0) * self.total_steps)
        warmup = min(warmup, self.total_steps - 1)
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.lr * opt.min_lr_ratio, lr_warmup_steps=warmup,
            lr_decay_steps=self.total_steps, lr_decay_style=opt.schedule, start_wd=opt.weight_decay,
            end_wd=opt.weight_decay, wd_incr_steps=self.total_steps, wd_incr_style="constant")
        return optimizer, scheduler

    # ---- resume / save ---------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.ckpt.latest_intact() if self.ckpt else None
        if path is None:
            log.warning("--resume: no complete checkpoint under %s, starting from step 0", self.recipe.checkpoint.dir)
            return
        state = self.ckpt.load(path, self.model, self.optimizer)
        self.step = state["step"]
        self.loader.reset(SamplerState(**state["sampler"]))
        self.scheduler.load_state_dict(state["scheduler"])
        self.skips.load_state_dict(state.get("skips", {}))
        self.metrics = state.get("metrics", {})
        self.metrics_step = state.get("metrics_step")
        self.faults.update(state.get("faults", {}))
        self.bad_in_a_row = int(state.get("bad_in_a_row", 0))
        self.finished = bool(state.get("finished"))
        if self.ctx.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self, finished: bool = False) -> Path:
        if self.recipe.checkpoint.keep_best and self.val_set is not None and self.metrics_step != self.step:
            self.metrics = self._validate()  # keep_best ranks checkpoints by metrics of their own step
        state = {"sampler": self.loader.consumed_state.to_dict(), "scheduler": self.scheduler.state_dict(),
                 "skips": self.skips.state_dict(), "metrics": self.metrics, "metrics_step": self.metrics_step,
                 "faults": dict(self.faults), "bad_in_a_row": self.bad_in_a_row, "stage": self.recipe.stage.name,
                 "finished": finished}
        with params_in_sync(self.ddp):
            return self.ckpt.save(self.step, self.model, self.optimizer, state)

    def _should_save(self, epoch_ended: bool) -> bool:
        c = self.recipe.checkpoint
        if self.ckpt is None or self.step >= self.total_steps:
            return False
        return bool((c.save_interval and self.step % c.save_interval == 0) or (c.save_every_epoch and epoch_ended))

    # ---- the loop --------------------------------------------------------------------------
    def _account_skips(self, skipped: list[tuple[str, str]], supervised: int) -> int:
        """Skip counts agree on every rank (summed over DP) before the budget is checked; returns
        the supervised tokens of the whole global batch (summed along with them)."""
        counts = flags([0] * (len(SKIP_REASONS) + 1))
        for reason, message in skipped:
            counts[SKIP_REASONS.index(reason if reason in SKIP_REASONS else "other")] += 1
            if self.ctx.tp_rank == 0 and self.ctx.pp_rank == 0:
                log.warning("skipped sample: %s" if reason not in self.skips.kept_reasons else "%s", message)
        counts[-1] = supervised
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        counts = counts.tolist()
        last = skipped[-1][1] if skipped else ""
        self.skips.update(self.recipe.train.global_batch_size, dict(zip(SKIP_REASONS, counts[:-1])), last)
        return counts[-1]

    def _batches(self) -> tuple[list[dict], int]:
        """This rank's micro-batches that have a supervised token (at least one while the global
        batch has any, so the rank takes part in the gradient reduction), and the global batch's
        supervised-token count. A template mismatch on any rank stops every rank."""
        try:
            batches, skipped = self.loader.next_step()
            error = None
        except TemplateMismatch as err:
            batches, skipped, error = [], [], err
        agree_on_error(error, parallel_state.get_data_parallel_group(with_context_parallel=True))
        tokens = [supervised_tokens(b) for b in batches]
        total = self._account_skips(skipped, sum(tokens))
        if getattr(self.task, "runs_every_micro_batch", False):   # each one is a collective over DP ranks
            kept = batches
        else:
            kept = [b for b, n in zip(batches, tokens) if n] or batches[:1]
        return [to_device(b, self.ctx.device) for b in kept], total

    def _step_scalars(self, result, seconds: float, counts: StepCounts) -> dict[str, float]:
        r = self.recipe
        scalars = {f"train/{name}": value for name, value in result.losses.items() if name not in ("lm_loss", "loss")}
        scalars.update({"train/loss": main_loss(result.losses), "train/grad_norm": result.grad_norm or 0.0,
                        "train/tokens_per_s": counts.real_tokens / seconds,
                        "train/padding_fraction": counts.padding_fraction,
                        "train/samples_per_s": r.train.global_batch_size / seconds,
                        "train/skipped_samples": float(self.skips.skipped)})
        for kind, count in getattr(self.loader.backend, "fallbacks", {}).items():
            scalars[f"data/pil_fallback_{kind}"] = float(count)
        opt = r.optimizer
        for component in r.stage.trainable:  # the scheduler's LR for each component's group
            max_lr = r.stage.lr.get(component, opt.lr)
            scalars[f"lr/{component}"] = self.scheduler.get_lr({"max_lr": max_lr, "min_lr": max_lr * opt.min_lr_ratio})
        peak = peak_flops(self.ctx.device)
        if peak:
            achieved = counts.flops / seconds / self.ctx.world_size
            scalars["train/tflops_per_gpu"] = achieved / 1e12
            scalars["train/mfu"] = achieved / peak
        return scalars

    def run(self) -> dict[str, float]:
        r = self.recipe
        log_dir = Path(r.logging.dir) if r.logging.dir else (Path(r.checkpoint.dir) / "tensorboard" if r.checkpoint.dir else None)
        logger = MetricsLogger(self.ctx.is_main, log_dir, self.total_steps, self.step, r.logging.tensorboard,
                               r.logging.progress, description=r.stage.name)
        loss_fn = self.task.loss_fn()
        if self.finished:
            logger.print(f"{r.stage.name}: already finished at step {self.step} ({self.recipe.checkpoint.dir})")
            logger.close()
            return dict(self.metrics)
        set_train_mode(self.model)
        stop = StopRequest(r.train.exit_duration_minutes)
        try:
            while self.step < self.total_steps:
                self._train_one_step(logger, loss_fn)
                epoch_ended = self.loader.consumed_state.step_in_epoch == self.sampler.steps_per_epoch
                if r.train.eval_interval and self.step % r.train.eval_interval == 0 and self.val_set is not None:
                    self.metrics = self._validate()
                    logger.log(self.step, self.metrics)
                if self.step == self.total_steps:
                    break
                reason = stop.poll()
                if reason is None and self.step == r.train.exit_at_step:
                    reason = "train.exit_at_step"
                if reason is not None:
                    self._stop_early(logger, reason)
                    return dict(self.metrics)
                if self._should_save(epoch_ended):
                    self.save()
            return self._finish(logger)
        finally:
            stop.close()
            logger.close()

    def _train_one_step(self, logger: MetricsLogger, loss_fn) -> None:
        r = self.recipe
        start = time.perf_counter()
        batches, supervised = self._batches()
        if supervised == 0:
            self._empty_step(logger)
            return
        counts = count_step(batches, r.model, set(r.stage.trainable), parallel_state.get_data_parallel_group(),
                            self.ctx.device)
        rows = 1 if r.data.packing else r.train.micro_batch_size  # a packed micro-batch is one THD row
        result = train_step([self.ddp], self.optimizer, batches, loss_fn, r.train.seq_length, rows)
        if not result.skipped:
            self.scheduler.step(1)
        self.step += 1
        self._count_bad_step(result, batches, logger)
        seconds = time.perf_counter() - start
        scalars = self._step_scalars(result, seconds, counts)
        scalars.update(self._fault_scalars())
        logger.log(self.step, scalars)
        logger.advance(self.step, scalars, seconds)
        if self.step % r.train.log_interval == 0 or self.step == self.total_steps:
            logger.print(f"step {self.step}/{self.total_steps} loss {scalars['train/loss']:.4f} "
                         f"grad_norm {scalars['train/grad_norm']:.3f} {scalars['train/tokens_per_s']:.0f} tok/s "
                         f"(padding {100 * scalars['train/padding_fraction']:.0f}%)")

    def _empty_step(self, logger: MetricsLogger) -> None:
        """No sample of the global batch has a supervised token (all skipped, or nothing to
        predict): no forward, no update, no LR step; counted and logged."""
        self.step += 1
        self.faults["empty_steps"] += 1
        logger.log(self.step, self._fault_scalars())
        logger.advance(self.step, {"train/loss": float("nan"), "train/skipped_samples": float(self.skips.skipped)}, 0.0)
        logger.print(f"step {self.step}/{self.total_steps}: no supervised token in the global batch "
                     f"({self.recipe.train.global_batch_size} samples): step skipped without an update "
                     f"({self.faults['empty_steps']} so far)")

    def _count_bad_step(self, result, batches: list[dict], logger: MetricsLogger) -> None:
        """A NaN/Inf loss or gradient norm (every rank skipped the update): log the step and its
        samples; ``train.max_bad_steps`` in a row stop the run."""
        if not result.not_finite:
            self.bad_in_a_row = 0
            return
        self.faults["bad_steps"] += 1
        self.bad_in_a_row += 1
        bad = [sid for i in result.bad_micro_batches for sid in batches[i]["sample_ids"]]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (bad, [sid for b in batches for sid in b["sample_ids"]]))
        named = list(dict.fromkeys(sid for b, _ in gathered for sid in b))
        samples = (f"micro-batches with a non-finite loss hold {named}" if named else
                   f"the step's samples: {list(dict.fromkeys(sid for _, every in gathered for sid in every))}")
        limit = self.recipe.train.max_bad_steps
        message = (f"step {self.step}: loss {main_loss(result.losses)} / grad norm {result.grad_norm} is not finite: "
                   f"update skipped on every rank ({self.bad_in_a_row} in a row, train.max_bad_steps={limit}); {samples}")
        logger.print(message)
        if self.bad_in_a_row >= limit:
            raise RunStop(f"{limit} consecutive steps with a non-finite loss or gradient norm; last: {message}")

    def _fault_scalars(self) -> dict[str, float]:
        """Skips by reason, empty and non-finite steps: cumulative counts for TensorBoard."""
        scalars = {f"skipped/{reason}": float(n) for reason, n in self.skips.counts.items()}
        scalars.update({f"train/{name}": float(n) for name, n in self.faults.items()})
        return scalars

    def _stop_early(self, logger: MetricsLogger, reason: str) -> None:
        """Preemption, a time limit or train.exit_at_step: save and leave; --resume continues."""
        if self.ckpt is None:
            logger.print(f"stopping at step {self.step} ({reason}); no checkpoint.dir, so nothing was saved")
            return
        path = self.save()
        logger.print(f"stopping at step {self.step} ({reason}): saved {path}; continue with --resume")

    def _eval_context(self) -> EvalContext:
        r = self.recipe
        return EvalContext([self.ddp], self.tokenizer, r.model, getattr(self.task, "head", None), r.train.seq_length,
                           r.train.micro_batch_size, self.ctx.device, r.data.end_of_chunk, tile_planner(r.model, r.data))

    def _validate(self) -> dict[str, float]:
        with params_in_sync(self.ddp):
            metrics = self.task.validate(self._eval_context(), self.val_set)
        set_train_mode(self.model)
        self.metrics_step = self.step
        return metrics

    def _finish(self, logger: MetricsLogger) -> dict[str, float]:
        r = self.recipe
        metrics = self._validate() if self.val_set is not None else {}
        with params_in_sync(self.ddp):
            metrics.update(self.task.evaluate(self._eval_context()))
            if self.benchmarks:
                metrics.update(self._run_benchmarks(logger))
        set_train_mode(self.model)
        self.metrics = metrics
        logger.log(self.step, {f"eval/{k}" if "/" not in k else k: v for k, v in metrics.items()})
        path = None
        if self.ckpt is not None:
            path = self.save(finished=True)
            if self.ctx.is_main:
                (Path(r.checkpoint.dir) / "final_metrics.json").write_text(
                    json.dumps({"step": self.step, "checkpoint": str(path), "metrics": metrics,
                                "skipped": self.skips.state_dict()}, indent=2))
        if r.stage.lora is not None and (r.stage.lora.save_merged or r.stage.lora.export_peft):
            self._export_lora(logger)
        logger.print(logger.summary(r.stage.name, self.step, path, metrics))
        logger.print(f"[{r.stage.name}] {self.skips.summary()}; empty steps {self.faults['empty_steps']}, "
                     f"steps with a non-finite loss or gradient {self.faults['bad_steps']}")
        return metrics

    def _export_lora(self, logger: MetricsLogger) -> None:
        """Merged checkpoint and/or PEFT adapters + the HF-converted model they apply to."""
        from megavlm.parallel.gather import gather_shards
        from megavlm.peft.lora import merge_lora, unmerge_lora
        from megavlm.training.checkpoint import save_model

        r, root = self.recipe, Path(self.recipe.checkpoint.dir or "outputs")
        lora = r.stage.lora
        if lora.save_merged:
            merge_lora(self.model)
            save_model(self.model, r.model, root / "merged", exclude=".lora.")
            unmerge_lora(self.model)
            logger.print(f"wrote the merged checkpoint {root / 'merged'}")
        if lora.export_peft:
            from megavlm.peft.export import export_for_hf
            from megavlm.peft.lora import full_precision_state

            shards = gather_shards(full_precision_state(self.model), self.ctx.tp_rank, self.ctx.pp_rank,
                                   self.ctx.dp_rank)
            if self.ctx.is_main:
                adapter = get_family(r.model.family).adapter_cls(r.model, self.ctx.tp_size, self.ctx.pp_size,
                                                                 r.parallel.first_stage_layers,
                                                                 r.parallel.last_stage_layers)
                peft_dir, base_dir = export_for_hf(shards, r.model, adapter, lora, root)
                logger.print(f"wrote PEFT adapters {peft_dir} for the HF model {base_dir}")
            dist.barrier()


def supervised_tokens(batch: dict) -> int:
    """Tokens a micro-batch trains on: labelled tokens, or (image-text pairs) its samples."""
    if "labels" in batch:
        return int((batch["labels"] != IGNORE_INDEX).sum())
    return len(batch["sample_ids"])


def main_loss(losses: dict[str, float]) -> float:
    return losses["loss"] if "loss" in losses else losses["lm_loss"]


def to_device(batch: dict, device) -> dict:
    """Tensors (and the cu_seqlens of packed batches) onto the training device."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
        elif key == "packed_seq_params":
            value = dataclasses.replace(value, cu_seqlens_q=value.cu_seqlens_q.to(device),
                                        cu_seqlens_kv=value.cu_seqlens_kv.to(device))
        out[key] = value
    return out

