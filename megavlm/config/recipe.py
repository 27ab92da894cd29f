"""A recipe: one training stage, fully described (a YAML file is a serialised ``Recipe``).

``model`` starts from a named flavor (``family`` + ``flavor``); every other key under ``model``
overrides that flavor's value. Unknown keys and bad values anywhere are errors naming the key and
the file; ``key=value`` overrides from the command line are validated the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.config.schema import ConfigError, apply_overrides, check, from_dict, to_dict

COMPONENT_NAMES = ("vision", "connector", "fusion", "llm", "lora", "text")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the language model's linears; the base stays frozen."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])   # q k v o gate up down
    quantize_base: Literal["none", "nf4"] = "none"    # nf4: QLoRA (frozen base in 4-bit NF4, double-quantised)
    save_merged: bool = False    # at the end, also write a checkpoint with the adapters merged into the base
    export_peft: bool = False    # at the end, also write the adapters in PEFT's format for the HF-converted model

    def __post_init__(self):
        check(self.rank > 0, "stage.lora.rank", "must be positive")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        check(not unknown and bool(self.targets), "stage.lora.targets",
              f"unknown or no target(s) {unknown}; known: {', '.join(LORA_TARGETS)}")
        check(0 <= self.dropout < 1, "stage.lora.dropout", "must be in [0, 1)")
        check(not (self.save_merged and self.quantize_base == "nf4"), "stage.lora.save_merged",
              "merging into NF4 base weights is not supported; merge from the full-precision base instead")


@dataclass
class StageConfig:
    """What trains in this stage, and from where it starts."""

    name: str = "stage"
    trainable: list[str] = field(default_factory=lambda: ["connector"])
    # Per-component learning rate and weight decay; components not listed use optimizer.lr / .weight_decay.
    lr: dict[str, float] = field(default_factory=dict)
    weight_decay: dict[str, float] = field(default_factory=dict)
    init_from: Optional[str] = None      # a megavlm checkpoint (any TP/PP layout): model weights only
    init_from_hf: Optional[str] = None   # or an HF checkpoint directory of the same family
    # or stand-alone pretrained parts, e.g. {vision: /models/clip-vit-large-patch14-336, llm: /models/vicuna-7b-v1.5}
    # (HF directories); components not listed keep their random initialisation (the connector)
    init_components_from_hf: dict[str, str] = field(default_factory=dict)
    # or components from megavlm checkpoints of another stage or family, e.g. {vision: outputs/clip/debug}:
    # the ViT a contrastive (CLIP/SigLIP) stage trained; the tensors must match in name and shape
    init_components_from: dict[str, str] = field(default_factory=dict)
    lora: Optional[LoRAConfig] = None    # LoRA / QLoRA: then "lora" trains and "llm" does not
    # Objective weights of a multi-objective head (BLIP-2 stage 1: itc, itm, itg; default 1 each)
    loss_weights: dict[str, float] = field(default_factory=dict)
    # Layer-wise LR decay of the vision encoder (InternVL, BEiT): ViT layer i of L trains at
    # lr_vision * decay^(L - i), the embeddings at decay^(L + 1), the final norm at lr_vision.
    vision_layer_decay: Optional[float] = None

    def __post_init__(self):
        for key, names in (("stage.trainable", self.trainable), ("stage.lr", list(self.lr)),
                           ("stage.weight_decay", list(self.weight_decay))):
            unknown = [n for n in names if n not in COMPONENT_NAMES]
            check(not unknown, key, f"unknown component(s) {unknown}; known: {', '.join(COMPONENT_NAMES)}")
        check(bool(self.trainable), "stage.trainable", "at least one component must train")
        if self.lora is not None:
            check("lora" in self.trainable, "stage.trainable", "stage.lora is set: list 'lora' among the trainable components")
            check("llm" not in self.trainable, "stage.trainable", "with stage.lora the LLM base stays frozen: remove 'llm'")
        else:
            check("lora" not in self.trainable, "stage.trainable", "'lora' trains only with a stage.lora section")
        if self.vision_layer_decay is not None:
            check(0 < self.vision_layer_decay <= 1, "stage.vision_layer_decay", "must be in (0, 1]")
            check("vision" in self.trainable, "stage.vision_layer_decay", "the vision encoder does not train in this stage")
        check(not (self.init_from_hf and (self.init_from or self.init_components_from_hf or self.init_components_from)),
              "stage.init_from_hf", "init_from_hf gives the whole model: do not combine it with init_from / "
                                    "init_components_from_hf / init_components_from")
        for key, names in (("stage.init_components_from", self.init_components_from),
                           ("stage.init_components_from_hf", self.init_components_from_hf)):
            unknown = [n for n in names if n not in COMPONENT_NAMES]
            check(not unknown, key, f"unknown component(s) {unknown}; known: {', '.join(COMPONENT_NAMES)}")


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.0         # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Optional[int] = None
    warmup_ratio: Optional[float] = None  # of the total steps; used when warmup_steps is unset
    distributed: bool = False         # megatron-core's distributed optimizer (ZeRO-1 over DP)

    def __post_init__(self):
        check(self.lr > 0, "optimizer.lr", "must be positive")
        check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, "optimizer.warmup_ratio", "must be in [0, 1)")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")


DATA_FORMATS = Literal["captions", "conversations", "interleaved", "shards"]


@dataclass
class SourceConfig:
    """One dataset of a mixture."""

    path: str = ""
    format: DATA_FORMATS = "conversations"
    weight: float = 1.0
    root: Optional[str] = None
    name: str = ""

    def __post_init__(self):
        check(bool(self.path), "data.sources[].path", "each source needs a path")
        check(self.weight >= 0, "data.sources[].weight", "must be >= 0")


@dataclass
class AugmentConfig:
    """Light augmentation (stage 2): RandomResizedCrop, brightness/contrast jitter, horizontal flip."""

    enabled: bool = False
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    jitter: float = 0.1
    flip_prob: float = 0.5
    flip_text: Literal["swap", "skip"] = "swap"   # text with left/right: swap the words, or do not flip

    def __post_init__(self):
        check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "data.augment.crop_scale",
              "must be [low, high] within (0, 1]")
        check(0 <= self.jitter < 1, "data.augment.jitter", "must be in [0, 1)")
        check(0 <= self.flip_prob <= 1, "data.augment.flip_prob", "must be in [0, 1]")


@dataclass
class DataConfig:
    format: DATA_FORMATS = "captions"
    train: str = ""                      # the training file (or a shard index); or give `sources`
    sources: list[SourceConfig] = field(default_factory=list)   # a weighted mixture instead of `train`
    samples_per_epoch: Optional[int] = None   # mixture epoch size (default: all sources' samples)
    curriculum_key: Optional[str] = None # order samples easy -> hard by this numeric record field
    validation: Optional[str] = None
    test: Optional[str] = None
    root: Optional[str] = None           # image paths are relative to it (default: the file's folder)
    tokenizer: str = ""
    # tokens appended after the tokenizer's vocabulary, in order (HF "added tokens"), e.g.
    # [<image>] for Vicuna (LLaVA-1.5: id 32000); the embedded tokenizer already has its markers
    added_tokens: list[str] = field(default_factory=list)
    # the tokenizer's piece for image positions when it is not "<image>" (Fuyu-8B: "|SPEAKER|"); the
    # data still marks images with <image> tags
    image_piece: Optional[str] = None
    template: str = "plain"
    end_of_chunk: Optional[str] = None   # interleaved documents: marker after each text chunk
    embedded: Optional[str] = None       # generate the embedded dataset here first (quick start)
    image_backend: Literal["auto", "pil", "dali"] = "auto"   # auto: DALI (nvJPEG) on GPUs, else PIL
    packing: bool = False                # pack samples into seq_length rows (THD, cu_seqlens)
    # dynamic resolution (InternVL): each image becomes 1..max_tiles tiles of the ViT's size chosen
    # by aspect ratio, plus a thumbnail when there are several; 0: one resized image
    max_tiles: int = 0
    tile_thumbnail: bool = True
    # text only: every sample's images and <image> tags are dropped (an LLM warm-up on the text of an
    # image data set, e.g. the quick start's stand-in for a pretrained LLM)
    drop_images: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = 0                 # image-decoding threads (PIL) / DALI threads
    prefetch: bool = True                # prepare the next step while this one trains
    max_skip_fraction: float = 0.01      # stop when more than this fraction of samples is bad...
    min_skip_budget: int = 10            # ...and more than this many (a few bad records early on never stop a run)
    # assistant text with characters the tokenizer maps to its unknown piece: train on it with the
    # unknown pieces, or skip the sample (counted as unrepresentable_text either way)
    unrepresentable_text: Literal["train", "skip"] = "train"
    shuffle: bool = True

    def __post_init__(self):
        check(0 <= self.max_skip_fraction <= 1, "data.max_skip_fraction", "must be in [0, 1]")
        check(self.min_skip_budget >= 0, "data.min_skip_budget", "must be >= 0")
        check(self.max_tiles >= 0, "data.max_tiles", "must be >= 0 (0: no tiling)")
        check(not (self.train and self.sources), "data.sources", "give data.train or data.sources, not both")
        check(self.samples_per_epoch is None or self.samples_per_epoch > 0, "data.samples_per_epoch", "must be positive")


@dataclass
class TrainConfig:
    global_batch_size: int = 32
    micro_batch_size: int = 4
    seq_length: int = 128
    epochs: float = 1.0
    max_steps: Optional[int] = None      # overrides epochs when set
    exit_at_step: Optional[int] = None   # stop at this step with a checkpoint (e.g. before a time limit); resume later
    exit_duration_minutes: Optional[float] = None   # stop with a checkpoint after this much wall time; resume later
    max_bad_steps: int = 3               # consecutive steps with a NaN/Inf loss or gradient norm before the run stops
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    recompute: bool = False
    seed: int = 1234
    log_interval: int = 10
    eval_interval: Optional[int] = None  # steps between validation passes; None: only at the end
    eval_samples: int = 200              # validation samples per pass
    # megatron-core DDP: overlap the gradient reduce with the backward (None: on for GPUs)
    overlap_grad_reduce: Optional[bool] = None
    # distributed optimizer only: overlap the updated-parameter all-gather with the next forward (None: on for GPUs)
    overlap_param_gather: Optional[bool] = None

    def __post_init__(self):
        check(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
              f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        check(self.epochs > 0, "train.epochs", "must be positive")
        check(self.max_steps is None or self.max_steps > 0, "train.max_steps", "must be positive")
        check(self.exit_duration_minutes is None or self.exit_duration_minutes > 0, "train.exit_duration_minutes",
              "must be positive")
        check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")


@dataclass
class CheckpointConfig:
    dir: str = ""
    save_interval: Optional[int] = None  # steps
    save_every_epoch: bool = False
    keep_last: int = 2
    keep_best: int = 0
    best_metric: str = "val/loss"
    best_mode: Literal["min", "max"] = "min"
    # Save only what trains (adapters, connector) and its optimizer state: small files; resuming
    # rebuilds the frozen rest from stage.init_from. Required for QLoRA.
    trainable_only: bool = False

    def __post_init__(self):
        check(self.keep_last >= 1, "checkpoint.keep_last", "must keep at least the last checkpoint")
        check(self.keep_best >= 0, "checkpoint.keep_best", "must be >= 0")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    dir: Optional[str] = None            # default: <checkpoint.dir>/tensorboard
    progress: bool = True                # rich progress line with ETA on rank 0


@dataclass
class BenchmarkConfig:
    """One benchmark from a local copy in its published format (eval/benchmarks/)."""

    name: str = ""                       # vqav2, okvqa, textvqa, coco_captions, pope, mmbench, ...
    path: str = ""                       # its directory (or file)
    max_samples: Optional[int] = None    # the first N questions (all rotations of each); None: all

    def __post_init__(self):
        from megavlm.eval.benchmarks import BENCHMARK_NAMES

        check(self.name in BENCHMARK_NAMES, "eval.benchmarks[].name",
              f"unknown benchmark {self.name!r}; known: {', '.join(BENCHMARK_NAMES)}")
        check(bool(self.path), "eval.benchmarks[].path", f"benchmark {self.name!r} needs a path")
        check(self.max_samples is None or self.max_samples >= 0, "eval.benchmarks[].max_samples", "must be >= 0")


@dataclass
class EvalConfig:
    """Held-out metrics at the end of the stage (and every train.eval_interval steps)."""

    captions: Optional[str] = None       # captions JSONL: teacher-forced caption token accuracy
    vqa: Optional[str] = None            # conversations JSON: greedy VQA exact match on the first turn
    blank_image_baseline: bool = True    # also score the same model given a blank image
    max_samples: int = 200
    max_new_tokens: int = 8
    rerank_top_k: int = 8                # BLIP-2 retrieval: ITM re-ranks the ITC top-k
    # captions JSONL: few-shot captioning (Flamingo-style interleaved prompts of k example
    # image-caption pairs, then the query image); caption token accuracy per k in few_shot
    few_shot_captions: Optional[str] = None
    few_shot: list[int] = field(default_factory=lambda: [0, 2, 4])
    # standard benchmarks at the end of the stage: [{name, path, max_samples}], answers generated
    # greedily with the KV cache (eval/benchmark_runner.py); results in <checkpoint.dir>/eval/
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    # a CLIP / SigLIP checkpoint (megavlm, e.g. a contrastive stage's, or an HF directory): the VLM
    # captions the first max_samples images of eval.captions and clip_similarity is their mean CLIP
    # similarity (beside a blank image's caption's and the reference captions'); null: not measured
    clip_model: Optional[str] = None
    clip_tokenizer: Optional[str] = None   # the CLIP model's tokenizer when it is not beside the checkpoint
    caption_max_new_tokens: int = 24       # length of the captions generated for clip_similarity

    def __post_init__(self):
        check(all(k >= 0 for k in self.few_shot), "eval.few_shot", "shot counts must be >= 0")
        check(self.caption_max_new_tokens > 0, "eval.caption_max_new_tokens", "must be positive")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        tp = self.parallel.tensor_parallel
        for key, module, heads in self.model.attention_heads():
            check(heads % tp == 0, key, f"{module} has {heads} heads, which parallel.tensor_parallel={tp} does not "
                                        "divide (tensor parallelism gives every rank the same number of heads; "
                                        "model.vision.tensor_parallel / model.connector.tensor_parallel: 1 keep "
                                        "the ViT / the Q-Former or resampler whole on every rank; "
                                        "model.vision.padded_heads / model.qformer.padded_heads / "
                                        "model.flamingo.resampler_padded_heads add zero dummy heads, e.g. "
                                        "tools/convert_checkpoint.py hf-to-megavlm --pad-heads-for-tp)")
        lora = self.stage.lora
        if lora is not None:
            check(self.model.transformer_impl == "local", "model.transformer_impl",
                  "LoRA adapts megatron-core's local parallel linears; use transformer_impl: local")
            check(lora.quantize_base != "nf4" or self.checkpoint.trainable_only, "checkpoint.trainable_only",
                  "QLoRA keeps the base in NF4 only in memory: set checkpoint.trainable_only: true")
            if lora.export_peft:
                from megavlm.peft.export import export_problem

                problem = export_problem(self.model, lora)
                check(problem is None, "stage.lora.export_peft", f"cannot be written for PEFT: {problem}")
        if self.parallel.sequence_parallel:
            self._check_sequence_parallel()
        if self.model.head == "contrastive":
            self._check_contrastive()
        check(self.eval.clip_model is None or (self.model.head == "lm" and bool(self.eval.captions)), "eval.clip_model",
              "clip_similarity scores the captions a VLM (head: lm) generates for eval.captions: set eval.captions")
        check(not (self.model.prefix_lm and self.data.packing and self.model.transformer_impl == "te"), "data.packing",
              "packed rows keep each sample's prefix-LM block in the local attention only: use transformer_impl: local")
        check(self.model.patches is None or not self.data.max_tiles, "data.max_tiles",
              "raw patch inputs (model.patches) keep each image at its own resolution: tiles do not apply")
        check(not self.train.overlap_param_gather or self.optimizer.distributed, "train.overlap_param_gather",
              "overlaps the distributed optimizer's parameter all-gather: set optimizer.distributed: true")

    def _check_contrastive(self) -> None:
        """A CLIP/SigLIP stage: both towers live on every pipeline rank; text rows are
        train.seq_length tokens, which the text encoder's positions must cover."""
        check(self.parallel.pipeline_parallel == 1, "parallel.pipeline_parallel",
              "a contrastive model (family clip) is tensor- and data-parallel only: use 1")
        check(not self.parallel.sequence_parallel, "parallel.sequence_parallel",
              "not implemented for the contrastive text encoder: use false")
        check(self.stage.lora is None, "stage.lora", "LoRA adapts an LLM; a contrastive model has none")
        lang, pooling = self.model.language, self.model.contrastive.text_pooling
        check(self.train.seq_length <= lang.max_seq_len, "train.seq_length",
              f"{self.train.seq_length} exceeds the text encoder's {lang.max_seq_len} positions (model.language.max_seq_len)")
        check(pooling != "last" or self.train.seq_length == lang.max_seq_len, "train.seq_length",
              f"text_pooling: last reads the last position of a row padded to model.language.max_seq_len "
              f"({lang.max_seq_len}), as the model is used at inference: set train.seq_length to it")

    def _check_sequence_parallel(self) -> None:
        tp = self.parallel.tensor_parallel
        check(self.train.seq_length % tp == 0, "train.seq_length",
              f"{self.train.seq_length} is not a multiple of tensor_parallel {tp}: sequence parallelism splits "
              f"every row evenly over the TP ranks")
        check(self.model.family != "flamingo", "parallel.sequence_parallel",
              "flamingo's gated cross-attention needs every text token next to the media latents it attends to "
              "(and under pipeline parallelism the latents travel as extra rows of the sequence): use false")
        check(self.stage.lora is None, "parallel.sequence_parallel",
              "LoRA adapters read the un-gathered input of the layers they adapt: use false with stage.lora")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve_model(data: dict, source: str) -> dict:
    """``model: {family, flavor, ...overrides}`` -> the full model dict of that flavor, overridden."""
    from megavlm.models.registry import flavor_config

    model = data.get("model")
    if model is None:
        raise ConfigError(f"missing key 'model' in {source}")
    if not isinstance(model, dict):
        raise ConfigError(f"bad value {model!r} for 'model' in {source}: expected a mapping")
    family, flavor = model.get("family", "llava"), model.get("flavor")
    if flavor is None:
        raise ConfigError(f"missing key 'model.flavor' in {source}")
    try:
        base = to_dict(flavor_config(family, flavor))
    except ValueError as err:
        raise ConfigError(f"bad value for 'model.flavor' in {source}: {err}") from None
    return dict(data, model=_merge(base, model))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    source = str(path) + (" (with command-line overrides)" if overrides else "")
    return from_dict(Recipe, _resolve_model(data, source), source=source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
