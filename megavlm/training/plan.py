"""Memory, parallel layout, time and cost of a training stage on a given GPU, before one is rented.

Memory per GPU, for the fullest pipeline stage:
  state        parameters, gradient buffers and optimizer state, counted on the meta device for
               the layout (memory.py): exact for megatron-core's DDP and optimizer
  activations  one micro-batch's, from activations.py's formulas, times the micro-batches a 1F1B
               stage holds at once (pp - its index), + the one layer full recompute rebuilds
  overhead     a fixed 2.5 GiB: CUDA context, NCCL buffers, cuBLAS workspaces
  fits when the sum is at most (1 - margin) of the GPU's memory (margin 10%: allocator
  fragmentation); otherwise the term that overflows is the first whose running sum, in the order
  above, passes that limit

Time per step:
  compute      per micro-batch and pipeline stage: the FLOPs of the stage's part (flops.py, + the
               forward that recompute repeats) / (TP x peak x MFU); a part kept whole on every TP
               rank (vision/connector tensor_parallel: 1) runs undivided
  TP           per transformer layer and micro-batch, two collectives in the forward (and in a
               recomputed forward) and two in the backward when gradients pass, each over the
               b·s·h activation: a ring moves 2(t-1)/t of it per GPU, over NVLink
  PP           the activation (/t with sequence parallelism) to the next stage, its gradient back
  pipeline     (m + pp - 1) x the slowest stage's micro-batch time with 1F1B (m micro-batches
               per pipeline), m x it without pipelining
  DP           gradient all-reduce 2(d-1)/d x the gradient buffer; with the distributed
               optimizer reduce-scatter (d-1)/d of it + all-gather (d-1)/d of the trainable
               parameters. megatron-core overlaps it with the last micro-batch's backward: only
               what exceeds one micro-batch's compute is added
  links        lower bounds at the peak link speeds of gpus.yaml: NVLink inside a node, the
               network across nodes (megatron-core's rank order: TP fastest, then DP, then PP)
Not modelled: the optimizer's own step, data loading, kernel launch gaps, stragglers.
Selective recompute is not a separate choice: it recomputes the attention scores, which
flash-style attention never stores.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml

from megavlm.config.schema import ConfigError
from megavlm.parallel.layout import pipeline_layer_ranges
from megavlm.training.activations import Placement, activation_estimate, in_flight_micro_batches
from megavlm.training.flops import recompute_flops, sample_flops

GIB = 2**30
OVERHEAD_BYTES = 2.5 * GIB
MARGIN = 0.10
GPUS_FILE = Path(__file__).with_name("gpus.yaml")


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: float | None
    nvlink_gbs: float
    network_gbs: float
    gpus_per_node: int
    mfu: float
    price_per_hour: float
    sources: tuple = ()

    @property
    def usable_bytes(self) -> float:
        return (1 - MARGIN) * self.memory_gib * GIB

    def peak_flops(self, dtype: str, fp8: bool) -> float:
        if fp8:
            if self.fp8_tflops is None:
                raise ConfigError(f"model.fp8 is set but the {self.name} has no FP8 Tensor Cores")
            return self.fp8_tflops * 1e12
        return self.bf16_tflops * 1e12 / (2 if dtype == "fp32" else 1)   # fp32 runs as TF32: half rate

    def describe(self) -> str:
        return (f"{self.name}: {self.memory_gib:g} GiB, {self.bf16_tflops:g} TFLOP/s bf16 dense, NVLink "
                f"{self.nvlink_gbs:g} GB/s and network {self.network_gbs:g} GB/s per GPU, {self.gpus_per_node} per node")


def load_gpus() -> dict[str, Gpu]:
    raw = yaml.safe_load(GPUS_FILE.read_text())
    return {key: Gpu(key=key, **dict(value, sources=tuple(value.get("sources", ())))) for key, value in raw.items()}


def find_gpu(key: str) -> Gpu:
    gpus = load_gpus()
    if key not in gpus:
        raise ConfigError(f"unknown GPU {key!r}; known ({GPUS_FILE.name}): {', '.join(gpus)}")
    return gpus[key]


@dataclass(frozen=True)
class Workload:
    """What one stage trains on: ``samples`` in all (epochs included), the mean real tokens and
    images per sample, and how rows are built (padded to seq_length, or packed)."""

    samples: int
    tokens_per_sample: float
    images_per_sample: float
    seq_length: int
    packed: bool
    sources: tuple = ()        # where each number came from, for the printout

    def rows(self, micro_batch: int) -> int:
        """Rows of seq_length tokens one micro-batch of ``micro_batch`` samples fills."""
        if not self.packed:
            return micro_batch
        return max(1, math.ceil(micro_batch * self.tokens_per_sample / self.seq_length))

    def computed_tokens_per_sample(self, micro_batch: int) -> float:
        """Tokens the GPUs compute per sample, padding included."""
        return self.rows(micro_batch) * self.seq_length / micro_batch

    def padding(self, micro_batch: int) -> float:
        return 1 - self.tokens_per_sample / self.computed_tokens_per_sample(micro_batch)


@dataclass(frozen=True)
class Layout:
    gpus: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    sequence_parallel: bool
    recompute: bool
    distributed_optimizer: bool

    def overrides(self) -> list[str]:
        """The recipe keys that select this layout."""
        return [f"parallel.tensor_parallel={self.tp}", f"parallel.pipeline_parallel={self.pp}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"train.micro_batch_size={self.micro_batch}", f"train.recompute={str(self.recompute).lower()}",
                f"optimizer.distributed={str(self.distributed_optimizer).lower()}"]

    def label(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp} mbs{self.micro_batch}"


@dataclass
class RankMemory:
    """Bytes on the GPU of one pipeline stage's rank."""

    pp_rank: int
    params: float
    grads: float
    optimizer: float
    activations: float
    activation_terms: dict = field(default_factory=dict)   # one micro-batch's, by layer type
    in_flight: int = 1
    overhead: float = OVERHEAD_BYTES

    def terms(self) -> list[tuple[str, float]]:
        return [("parameters", self.params), ("gradients", self.grads), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("overhead", self.overhead)]

    @property
    def total(self) -> float:
        return sum(v for _, v in self.terms())

    def overflow(self, limit: float) -> str | None:
        """The first term whose running sum passes ``limit``, or None when everything fits."""
        running = 0.0
        for name, value in self.terms():
            running += value
            if running > limit:
                return name
        return None


@dataclass
class StepTime:
    compute: float          # the slowest stage's micro-batch compute x micro-batches in flight order
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float          # the whole gradient (and parameter) exchange
    dp_exposed: float       # what of it is not hidden behind compute

    @property
    def step(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_exposed


@dataclass
class PlanRow:
    layout: Layout
    memory: RankMemory          # the fullest rank
    overflow: str | None
    time: StepTime
    steps: int
    tokens_per_s_per_gpu: float
    mfu: float
    price_per_hour: float

    @property
    def fits(self) -> bool:
        return self.overflow is None

    @property
    def hours(self) -> float:
        return self.steps * self.time.step / 3600

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.layout.gpus

    @property
    def cost(self) -> float:
        return self.gpu_hours * self.price_per_hour


def with_gpu_defaults(recipe):
    """The recipe as it runs on GPUs: megatron-core's DDP overlaps the gradient reduce (and the
    distributed optimizer's parameter gather) there, which sets how it buckets and pads buffers."""
    train = recipe.train
    overlap_grads = True if train.overlap_grad_reduce is None else train.overlap_grad_reduce
    return dataclasses.replace(recipe, train=dataclasses.replace(train, overlap_grad_reduce=overlap_grads))


class Planner:
    """Prices layouts of one recipe on one GPU type; model state is counted once per distinct rank."""

    def __init__(self, recipe, gpu: Gpu, workload: Workload, mfu: float | None = None, price: float | None = None):
        from megavlm.training.memory import recipe_dtype

        self.recipe, self.gpu, self.work = with_gpu_defaults(recipe), gpu, workload
        self.cfg = recipe.model
        self.trainable = set(recipe.stage.trainable)
        self.mfu = mfu or gpu.mfu
        self.price = gpu.price_per_hour if price is None else price
        self.dtype_bytes = recipe_dtype(recipe).itemsize
        self.peak = gpu.peak_flops(recipe.train.dtype, recipe.model.fp8 is not None)
        self._state: dict = {}

    # ---- layouts ---------------------------------------------------------------------------
    @cached_property
    def num_layers(self) -> int:
        return 0 if self.cfg.head == "qformer" else self.cfg.language.num_layers

    def tensor_parallel_sizes(self, gpus: int) -> list[int]:
        sizes = [t for t in (1, 2, 4, 8, 16) if t <= min(gpus, self.gpu.gpus_per_node)]
        return [t for t in sizes if all(heads % t == 0 for _, _, heads in self.cfg.attention_heads())]

    def pipeline_sizes(self, gpus: int) -> list[int]:
        if self.num_layers == 0 or self.cfg.head == "contrastive":   # contrastive models: TP and DP only
            return [1]
        return [p for p in (1, 2, 4, 8, 16, 32) if p <= gpus and self.layer_ranges(p) is not None]

    def layer_ranges(self, pp: int) -> list[tuple[int, int]] | None:
        par = self.recipe.parallel
        first, last = (par.first_stage_layers, par.last_stage_layers) if pp == par.pipeline_parallel else (None, None)
        try:
            return pipeline_layer_ranges(self.num_layers, pp, first, last)
        except Exception:   # this many stages cannot split the decoder
            return None

    def sequence_parallel_allowed(self, tp: int) -> bool:
        r = self.recipe
        return (tp > 1 and r.train.seq_length % tp == 0 and r.model.family != "flamingo" and r.stage.lora is None
                and r.model.head == "lm")

    def candidates(self, gpus: int) -> list[Layout]:
        """Every layout of ``gpus`` GPUs the recipe can run: TP inside a node, PP dividing the
        decoder, micro-batches that divide the global batch, recompute off and on. Sequence
        parallelism is on where the model allows it and the distributed optimizer whenever DP > 1:
        both only save memory at no extra communication."""
        gbs, out = self.recipe.train.global_batch_size, []
        for tp in self.tensor_parallel_sizes(gpus):
            for pp in self.pipeline_sizes(gpus):
                if gpus % (tp * pp):
                    continue
                dp = gpus // (tp * pp)
                for mbs in self.micro_batch_sizes():
                    if gbs % (mbs * dp):
                        continue
                    for recompute in (False, True):
                        out.append(Layout(gpus, tp, pp, dp, mbs, self.sequence_parallel_allowed(tp), recompute, dp > 1))
        return out

    def micro_batch_sizes(self) -> list[int]:
        """The recipe's micro-batch and the halvings below it (smaller ones fit where it does not)."""
        sizes, mbs = [], self.recipe.train.micro_batch_size
        while mbs >= 1:
            sizes.append(mbs)
            mbs //= 2
        return sizes

    # ---- memory ----------------------------------------------------------------------------
    def state(self, layout: Layout, pp_rank: int):
        from megavlm.training.memory import layout_state_bytes

        ranges = self.layer_ranges(layout.pp)
        stage = (pp_rank == 0, pp_rank == layout.pp - 1, ranges[pp_rank][1] - ranges[pp_rank][0] if ranges else 0)
        key = (layout.tp, layout.pp, stage, layout.dp if layout.distributed_optimizer else 1, layout.distributed_optimizer)
        if key not in self._state:
            self._state[key] = layout_state_bytes(self.recipe_for(layout), layout.tp, layout.pp, key[3], pp_rank,
                                                  layout.sequence_parallel)
        return self._state[key]

    def recipe_for(self, layout: Layout):
        """The recipe with ``layout`` applied (an uneven pipeline split only at the recipe's own PP)."""
        r = self.recipe
        keep_split = layout.pp == r.parallel.pipeline_parallel
        parallel = dataclasses.replace(r.parallel, tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                                       sequence_parallel=layout.sequence_parallel,
                                       first_stage_layers=r.parallel.first_stage_layers if keep_split else None,
                                       last_stage_layers=r.parallel.last_stage_layers if keep_split else None)
        return dataclasses.replace(
            r, parallel=parallel, optimizer=dataclasses.replace(r.optimizer, distributed=layout.distributed_optimizer),
            train=dataclasses.replace(r.train, micro_batch_size=layout.micro_batch, recompute=layout.recompute))

    def representative_ranks(self, pp: int) -> list[int]:
        """The first stage (ViT, connector), the fullest middle one, the last (output layer)."""
        return sorted({0, min(1, pp - 1), pp - 1})

    def rank_memory(self, layout: Layout, pp_rank: int) -> RankMemory:
        state = self.state(layout, pp_rank)
        ranges = self.layer_ranges(layout.pp)
        layers = ranges[pp_rank][1] - ranges[pp_rank][0] if ranges else 0
        rows = self.work.rows(layout.micro_batch)
        images = layout.micro_batch * self.work.images_per_sample / rows
        placement = Placement(layout.tp, layout.sequence_parallel, self.dtype_bytes,
                              "full" if layout.recompute else "off")
        est = activation_estimate(self.cfg, self.trainable, rows, self.work.seq_length, images, placement, layers,
                                  first_stage=pp_rank == 0, last_stage=pp_rank == layout.pp - 1)
        in_flight = in_flight_micro_batches(layout.pp, pp_rank, self.micro_batches(layout))
        activations = sum(est.terms.values()) * in_flight + est.working_set
        return RankMemory(pp_rank, state.params, state.grads, state.optimizer, activations, est.terms, in_flight)

    def memory(self, layout: Layout) -> RankMemory:
        return max((self.rank_memory(layout, k) for k in self.representative_ranks(layout.pp)), key=lambda m: m.total)

    # ---- time ------------------------------------------------------------------------------
    def micro_batches(self, layout: Layout) -> int:
        return self.recipe.train.global_batch_size // (layout.micro_batch * layout.dp)

    def _link(self, group_span: int) -> float:
        """Bytes/s of a group whose ranks span ``group_span`` consecutive global ranks."""
        return (self.gpu.nvlink_gbs if group_span <= self.gpu.gpus_per_node else self.gpu.network_gbs) * 1e9

    def stage_flops(self, layout: Layout, pp_rank: int) -> float:
        """FLOPs one TP rank of ``pp_rank`` runs per micro-batch."""
        work, cfg = self.work, self.cfg
        length = work.computed_tokens_per_sample(layout.micro_batch)
        model = sample_flops(cfg, length, work.images_per_sample, self.trainable)
        extra = recompute_flops(cfg, length, work.images_per_sample, self.trainable) if layout.recompute else None
        ranges = self.layer_ranges(layout.pp)
        share = (ranges[pp_rank][1] - ranges[pp_rank][0]) / self.num_layers if self.num_layers else 0.0
        tp = layout.tp
        flops = (model.llm + model.fusion + (extra.llm + extra.fusion if extra else 0)) * share / tp
        if pp_rank == layout.pp - 1:
            flops += model.head / tp
        if pp_rank == 0:
            vision = model.vision + (extra.vision if extra else 0)
            flops += vision / (1 if cfg.vision is not None and cfg.vision.tensor_parallel == 1 else tp)
            flops += model.connector / (1 if cfg.connector.tensor_parallel == 1 else tp)
        return flops * layout.micro_batch

    def _grads_pass_decoder(self) -> bool:
        return bool(self.trainable & {"vision", "connector", "fusion", "llm", "lora"})

    def tp_comm_seconds(self, layout: Layout, pp_rank: int) -> float:
        t = layout.tp
        if t == 1:
            return 0.0
        ring = 2 * (t - 1) / t
        e, cfg = self.dtype_bytes, self.cfg
        ranges = self.layer_ranges(layout.pp)
        layers = ranges[pp_rank][1] - ranges[pp_rank][0] if ranges else 0
        if cfg.flamingo is not None:
            layers += layers // cfg.flamingo.cross_attention_interval
        per_layer = 2 + (2 if self._grads_pass_decoder() else 0) + (2 if layout.recompute else 0)
        act = self.work.rows(layout.micro_batch) * self.work.seq_length * cfg.language.hidden_size * e
        total = layers * per_layer * act + (act if pp_rank == 0 and self.num_layers else 0)   # + the embedding's
        if pp_rank == 0 and cfg.vision is not None and cfg.vision.tensor_parallel != 1:
            vit_train = "vision" in self.trainable
            vit_tokens = layout.micro_batch * self.work.images_per_sample * cfg.vision.tokens_per_image
            collectives = 2 + (2 if vit_train else 0) + (2 if vit_train and layout.recompute else 0)
            total += cfg.vision.layers_to_build * collectives * vit_tokens * cfg.vision.hidden_size * e
        return total * ring / self._link(t)

    def pp_comm_seconds(self, layout: Layout, pp_rank: int) -> float:
        if layout.pp == 1 or pp_rank == layout.pp - 1:
            return 0.0
        act = (self.work.rows(layout.micro_batch) * self.work.seq_length * self.cfg.language.hidden_size
               * self.dtype_bytes / (layout.tp if layout.sequence_parallel else 1))
        directions = 2 if self._grads_pass_decoder() else 1
        return directions * act / self._link(layout.gpus)   # some stage pair is a node apart once PP leaves one

    def dp_comm_seconds(self, layout: Layout) -> float:
        d = layout.dp
        if d == 1:
            return 0.0
        state = self.state(layout, 0)
        if layout.distributed_optimizer:
            volume = (d - 1) / d * (state.grads + state.trainable_params * self.dtype_bytes)
        else:
            volume = 2 * (d - 1) / d * state.grads
        return volume / self._link(layout.tp * d)

    def step_time(self, layout: Layout) -> StepTime:
        parts = {k: (self.stage_flops(layout, k) / (self.peak * self.mfu), self.tp_comm_seconds(layout, k),
                     self.pp_comm_seconds(layout, k)) for k in self.representative_ranks(layout.pp)}
        slowest = max(parts.values(), key=sum)   # (compute, TP, PP) seconds of one micro-batch
        m = self.micro_batches(layout)
        compute, tp, p2p = (m * x for x in slowest)
        bubble = (layout.pp - 1) * sum(slowest)
        dp = self.dp_comm_seconds(layout)
        exposed = max(0.0, dp - sum(slowest))
        return StepTime(compute, tp, p2p, bubble, dp, exposed)

    # ---- a plan ----------------------------------------------------------------------------
    @cached_property
    def steps(self) -> int:
        train = self.recipe.train
        return train.max_steps or max(1, math.ceil(self.work.samples / train.global_batch_size))

    @cached_property
    def flops_per_sample(self) -> float:
        """Model FLOPs of one sample (no recompute): the MFU column's numerator."""
        return sample_flops(self.cfg, self.work.tokens_per_sample, self.work.images_per_sample, self.trainable).total

    def evaluate(self, layout: Layout) -> PlanRow:
        memory = self.memory(layout)
        time = self.step_time(layout)
        gbs = self.recipe.train.global_batch_size
        return PlanRow(layout, memory, memory.overflow(self.gpu.usable_bytes), time, self.steps,
                       gbs * self.work.tokens_per_sample / time.step / layout.gpus,
                       gbs * self.flops_per_sample / time.step / (layout.gpus * self.peak), self.price)

    def plan(self, gpus: int) -> tuple[list[PlanRow], list[PlanRow]]:
        """(the fastest fitting variant of every TP x PP, sorted by step time; for each TP x PP
        with no fitting variant, its smallest)."""
        best: dict = {}
        smallest: dict = {}
        for layout in self.candidates(gpus):
            row = self.evaluate(layout)
            key = (layout.tp, layout.pp)
            if row.fits and (key not in best or row.time.step < best[key].time.step):
                best[key] = row
            if key not in smallest or row.memory.total < smallest[key].memory.total:
                smallest[key] = row
        fitting = sorted(best.values(), key=lambda r: r.time.step)
        failing = sorted((r for k, r in smallest.items() if k not in best), key=lambda r: r.memory.total)
        return fitting, failing
