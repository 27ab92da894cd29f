"""LoRA on megatron-core's tensor-parallel linears, with per-target selection inside fused layers.

Targets: ``q``, ``k``, ``v`` (inside the fused QKV projection), ``o`` (attention output),
``gate``, ``up`` (inside the fused SwiGLU fc1) and ``down`` (fc2), in every decoder layer of the
language model. Each target gets A [r, in] and B [out, r] (B starts at zero, so a fresh adapter
leaves the model unchanged), scaled by alpha / r, sharded like the layer it adapts:

* column-parallel layers (QKV, fc1): B is split by output rows with the layer; A is replicated
  and its input gradient is all-reduced over TP (each rank's B shard contributes a part);
* row-parallel layers (o, fc2): A is split by input columns with the layer; the rank-r partial
  products are all-reduced (one [tokens, r] all-reduce) and B is replicated.

So any TP size trains, saves and reloads the same adapter. ``LoRALinear`` takes each adapted
linear's place and keeps its parameters and checkpoint keys (for QLoRA it computes the base
product from an NF4 weight).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from megavlm.config.recipe import LORA_TARGETS as TARGETS
from megavlm.models.common.tags import tag_component

# Which parallel linear holds each target, and which slot of its fused output rows.
_MODULE_OF = {"q": "self_attention.linear_qkv", "k": "self_attention.linear_qkv", "v": "self_attention.linear_qkv",
              "o": "self_attention.linear_proj", "gate": "mlp.linear_fc1", "up": "mlp.linear_fc1", "down": "mlp.linear_fc2"}


class LoRAAdapter(torch.nn.Module):
    """One target's A and B on one rank. ``parallel`` says which side of it TP splits:
    "out" (column-parallel layer: B rows) or "in" (row-parallel layer: A columns)."""

    def __init__(self, in_local: int, out_local: int, rank: int, alpha: float, dropout: float, parallel: str,
                 tp_group, dtype: torch.dtype, device):
        super().__init__()
        self.parallel, self.tp_group, self.scale = parallel, tp_group, alpha / rank
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_local, dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, rank, dtype=dtype, device=device))
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        sharded = self.lora_B if parallel == "out" else self.lora_A
        tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, 0 if parallel == "out" else 1, 1)
        if parallel == "out":  # A is replicated: the same init on every TP rank (default RNG stream)
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:                  # A is a TP shard: the model-parallel RNG stream
            with tensor_parallel.get_cuda_rng_tracker().fork():
                torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.lora_A)
        if self.parallel == "in":
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        else:
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return F.linear(h, self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A: this rank's share of the weight update (for merging)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


class LoRALinear(torch.nn.Module):
    """A megatron-core parallel linear (column- or row-parallel) with LoRA adapters added to its
    output; it takes the plain layer's place in the transformer layer.

    The base layer's parameters are registered here under their own names (``weight``, ``bias``),
    so checkpoint keys stay those of the plain layer and the adapters add ``lora.<target>.*``; the
    base layer itself is kept (not as a child module) for its forward and its sharded state dict.
    Targets inside a fused output (q/k/v of the QKV projection, gate/up of SwiGLU's fc1) fill their
    rows of it. With an NF4 base (QLoRA) the base product is computed from ``weight_nf4``.
    """

    def __init__(self, base, name: str, targets: list[str], cfg, config, gated: bool):
        super().__init__()
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.__dict__["base"] = base  # after the parameters: attribute lookups fall back to it
        self.weight_nf4 = None
        self.name, self.merged = name, False
        self.kind = "column" if isinstance(base, tensor_parallel.ColumnParallelLinear) else "row"
        out_local, in_local = base.weight.shape
        tp_group = base.tp_group
        tp = tp_group.size() if tp_group is not None else 1
        if name.endswith("linear_qkv"):
            groups, per, hd = config.num_query_groups // tp, config.num_attention_heads // config.num_query_groups, config.kv_channels
            self.layout, self.geom = "qkv", (groups, per, hd)
            rows = {"q": groups * per * hd, "k": groups * hd, "v": groups * hd}
        elif name.endswith("linear_fc1") and gated:
            self.layout, self.geom = "glu", out_local // 2
            rows = {"gate": out_local // 2, "up": out_local // 2}
        else:
            self.layout, self.geom = "single", None
            rows = {t: out_local for t in targets}
        parallel = "out" if self.kind == "column" else "in"
        self.lora = tag_component(torch.nn.ModuleDict({
            t: LoRAAdapter(in_local, rows[t], cfg.rank, cfg.alpha, cfg.dropout, parallel, tp_group,
                           base.weight.dtype, base.weight.device) for t in targets}), "lora")

    def __getattr__(self, name: str):
        # megatron-core reads the linear's own attributes (tp_group, skip_bias_add, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("base")
            if base is None:
                raise
            return getattr(base, name)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = self._base_forward(input_, weight, runtime_gather_output)
        if self.merged or not self.lora:
            return out, bias
        return out + self._delta(input_).to(out.dtype), bias

    def _base_forward(self, input_, weight, runtime_gather_output):
        if self.weight_nf4 is None:
            return self.base(input_, weight=weight, runtime_gather_output=runtime_gather_output) \
                if self.kind == "column" else self.base(input_)
        from megavlm.peft.nf4 import nf4_linear

        if self.kind == "column":
            out = nf4_linear(copy_to_tensor_model_parallel_region(input_, group=self.tp_group), self.weight_nf4)
        else:
            out = reduce_from_tensor_model_parallel_region(nf4_linear(input_, self.weight_nf4), group=self.tp_group)
        if self.bias is not None and not self.skip_bias_add:
            return out + self.bias, None
        return out, self.bias

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapters' output laid out like the fused output rows (zeros where no target)."""
        lead = x.shape[:-1]
        if self.layout == "qkv":
            g, per, hd = self.geom
            parts = [self.lora[t](x).view(*lead, g, slots, hd) if t in self.lora else x.new_zeros(*lead, g, slots, hd)
                     for t, slots in (("q", per), ("k", 1), ("v", 1))]
            return torch.cat(parts, dim=-2).reshape(*lead, -1)
        if self.layout == "glu":
            parts = [self.lora[t](x) if t in self.lora else x.new_zeros(*lead, self.geom) for t in ("gate", "up")]
            return torch.cat(parts, dim=-1)
        (adapter,) = self.lora.values()
        return adapter(x)

    def delta_weight(self) -> torch.Tensor:
        """Like ``_delta``, for the weight: this rank's [out_local, in_local] update."""
        first = next(iter(self.lora.values()))
        in_features, device = first.lora_A.shape[1], first.lora_A.device
        if self.layout == "qkv":
            g, per, hd = self.geom
            parts = [self.lora[t].delta_weight().view(g, slots, hd, in_features) if t in self.lora else
                     torch.zeros(g, slots, hd, in_features, device=device) for t, slots in (("q", per), ("k", 1), ("v", 1))]
            return torch.cat(parts, dim=1).reshape(-1, in_features)
        if self.layout == "glu":
            parts = [self.lora[t].delta_weight() if t in self.lora else torch.zeros(self.geom, in_features, device=device)
                     for t in ("gate", "up")]
            return torch.cat(parts, dim=0)
        return first.delta_weight()

    @torch.no_grad()
    def quantize_base(self) -> None:
        """QLoRA: the frozen base weight -> NF4 (``weight_nf4``); ``weight`` becomes None here and
        in the base layer, so the full-precision copy is freed."""
        from megavlm.peft.nf4 import BLOCK_SIZE, to_nf4

        if self.weight.numel() % BLOCK_SIZE:
            raise ValueError(f"{self.name}: a {tuple(self.weight.shape)} weight does not split into NF4 blocks of "
                             f"{BLOCK_SIZE} values")
        self.weight_nf4 = to_nf4(self.weight)
        for module in (self, self.base):
            del module._parameters["weight"]
            module.weight = None  # megatron-core reads .weight in places

    def get_extra_state(self):
        return self.base.get_extra_state()

    def set_extra_state(self, state) -> None:
        self.base.set_extra_state(state)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base layer's sharded state dict, and the adapters' tensors sharded along their TP
        dimension."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.base.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        for target, adapter in self.lora.items():
            tensors = {f"lora.{target}.lora_A": adapter.lora_A, f"lora.{target}.lora_B": adapter.lora_B}
            axis = {f"lora.{target}.lora_B": 0} if adapter.parallel == "out" else {f"lora.{target}.lora_A": 1}
            state.update(make_sharded_tensors_for_checkpoint(
                tensors, prefix, axis, sharded_offsets, tp_group=self.tp_group,
                dp_cp_group=(metadata or {}).get("dp_cp_group")))
        return state


def targets_by_module(targets: list[str]) -> dict[str, list[str]]:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; known: {', '.join(TARGETS)}")
    grouped: dict[str, list[str]] = {}
    for target in TARGETS:  # keep layout order
        if target in targets:
            grouped.setdefault(_MODULE_OF[target], []).append(target)
    return grouped


def apply_lora(language_model, cfg, gated: bool = True) -> int:
    """Insert adapters into every decoder layer of ``language_model`` (a GPTModel chunk);
    returns the number of adapted linears. For QLoRA every decoder linear's base weight goes to
    NF4 (as in the QLoRA paper), whether or not it carries an adapter."""
    config = language_model.config
    if config.sequence_parallel:
        raise ValueError("LoRA does not support sequence parallelism yet")
    grouped = targets_by_module(cfg.targets)
    paths = sorted(set(_MODULE_OF.values())) if cfg.quantize_base == "nf4" else list(grouped)
    count = 0
    for layer in language_model.decoder.layers:
        for path in paths:
            parent_path, attr = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise RuntimeError(f"{path} of layer {layer.layer_number} already has LoRA adapters")
            adapted = LoRALinear(base, path, grouped.get(path, []), cfg, config, gated)
            if cfg.quantize_base == "nf4":
                adapted.quantize_base()
            setattr(parent, attr, adapted)
            count += 1
    return count


def lora_modules(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def full_precision_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors by state-dict name, QLoRA's NF4 base weights dequantised under their
    ``.weight`` names (what an HF export of the base needs)."""
    from megavlm.peft.nf4 import dequantize

    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.weight_nf4 is not None:
            state[f"{name}.weight"] = dequantize(module.weight_nf4)
    return state


@torch.no_grad()
def merge_lora(model) -> None:
    """Fold every adapter into its base weight (W += scale * B @ A) and stop applying it."""
    for module in lora_modules(model):
        if module.merged:
            continue
        if module.weight_nf4 is not None:
            raise RuntimeError("merging into NF4 base weights would lose precision: merge into a full-precision copy")
        module.weight.add_(module.delta_weight().to(module.weight.dtype))
        module.merged = True


@torch.no_grad()
def unmerge_lora(model) -> None:
    for module in lora_modules(model):
        if module.merged:
            module.weight.sub_(module.delta_weight().to(module.weight.dtype))
            module.merged = False
