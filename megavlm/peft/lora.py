"""LoRA on megatron-core's tensor-parallel linears, with per-target selection inside fused layers.

Targets: ``q``, ``k``, ``v`` (inside the fused QKV projection), ``o`` (attention output),
``gate``, ``up`` (inside the fused SwiGLU fc1) and ``down`` (fc2), in every decoder layer of the
language model. Each target gets A [r, in] and B [out, r] (B starts at zero, so a fresh adapter
leaves the model unchanged), scaled by alpha / r, sharded like the layer it adapts:

* column-parallel layers (QKV, fc1): B is split by output rows with the layer; A is replicated
  and its input gradient is all-reduced over TP (each rank's B shard contributes a part);
* row-parallel layers (o, fc2): A is split by input columns with the layer; the rank-r partial
  products are all-reduced (one [tokens, r] all-reduce) and B is replicated.

So any TP size trains, saves and reloads the same adapter. The adapted module keeps its class,
parameters and checkpoint keys; its forward is replaced by one that adds the adapter's output
(and, for QLoRA, computes the base product from an NF4 weight).
"""
from __future__ import annotations

import math
import types

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


class _Adapted:
    """Forward replacements, bound to the adapted linear (``self``)."""

    @staticmethod
    def _base(self, input_, weight=None, runtime_gather_output=None):
        if getattr(self, "weight_nf4", None) is None:
            return self._lora_original_forward(input_, weight=weight, runtime_gather_output=runtime_gather_output) \
                if self._lora_kind == "column" else self._lora_original_forward(input_)
        from megavlm.peft.nf4 import nf4_linear

        if self._lora_kind == "column":
            out = nf4_linear(copy_to_tensor_model_parallel_region(input_, group=self.tp_group), self.weight_nf4)
        else:
            out = reduce_from_tensor_model_parallel_region(nf4_linear(input_, self.weight_nf4), group=self.tp_group)
        bias = self.bias
        if bias is not None and not self.skip_bias_add:
            return out + bias, None
        return out, bias

    @staticmethod
    def forward(self, input_, weight=None, runtime_gather_output=None):
        out, bias = _Adapted._base(self, input_, weight, runtime_gather_output)
        if self._lora_merged or not self.lora:
            return out, bias
        return out + self._lora_delta(input_).to(out.dtype), bias


def _fused_delta(module, x: torch.Tensor) -> torch.Tensor:
    """The adapters' output laid out like the module's fused output rows (zeros where no target)."""
    lead = x.shape[:-1]
    if module._lora_layout == "qkv":
        g, per, hd = module._lora_geom
        parts = []
        for target, slots in (("q", per), ("k", 1), ("v", 1)):
            if target in module.lora:
                parts.append(module.lora[target](x).view(*lead, g, slots, hd))
            else:
                parts.append(x.new_zeros(*lead, g, slots, hd))
        return torch.cat(parts, dim=-2).reshape(*lead, -1)
    if module._lora_layout == "glu":
        half = module._lora_geom
        parts = [module.lora[t](x) if t in module.lora else x.new_zeros(*lead, half) for t in ("gate", "up")]
        return torch.cat(parts, dim=-1)
    (adapter,) = module.lora.values()
    return adapter(x)


def _fused_delta_weight(module) -> torch.Tensor:
    """Like _fused_delta, for the weight: [out_local, in_local] update of this rank."""
    if module._lora_layout == "qkv":
        g, per, hd = module._lora_geom
        in_features = next(iter(module.lora.values())).lora_A.shape[1]
        parts = []
        for target, slots in (("q", per), ("k", 1), ("v", 1)):
            if target in module.lora:
                parts.append(module.lora[target].delta_weight().view(g, slots, hd, in_features))
            else:
                parts.append(torch.zeros(g, slots, hd, in_features, device=module.lora[next(iter(module.lora))].lora_A.device))
        return torch.cat(parts, dim=1).reshape(-1, in_features)
    if module._lora_layout == "glu":
        adapters = list(module.lora.values())
        in_features = adapters[0].lora_A.shape[1]
        parts = [module.lora[t].delta_weight() if t in module.lora else
                 torch.zeros(module._lora_geom, in_features, device=adapters[0].lora_A.device) for t in ("gate", "up")]
        return torch.cat(parts, dim=0)
    (adapter,) = module.lora.values()
    return adapter.delta_weight()


def _adapt_module(module, name: str, targets: list[str], cfg, config, gated: bool) -> None:
    kind = "column" if isinstance(module, tensor_parallel.ColumnParallelLinear) else "row"
    tp_group = module.tp_group
    tp = tp_group.size() if tp_group is not None else 1
    weight = module.weight
    out_local, in_local = weight.shape
    module._lora_name, module._lora_kind, module._lora_merged = name, kind, False
    if name.endswith("linear_qkv"):
        groups, per, hd = config.num_query_groups // tp, config.num_attention_heads // config.num_query_groups, config.kv_channels
        module._lora_layout, module._lora_geom = "qkv", (groups, per, hd)
        rows = {"q": groups * per * hd, "k": groups * hd, "v": groups * hd}
    elif name.endswith("linear_fc1") and gated:
        module._lora_layout, module._lora_geom = "glu", out_local // 2
        rows = {"gate": out_local // 2, "up": out_local // 2}
    else:
        module._lora_layout, module._lora_geom = "single", None
        rows = {t: out_local for t in targets}
    adapters = {}
    for target in targets:
        if kind == "column":
            adapters[target] = LoRAAdapter(in_local, rows[target], cfg.rank, cfg.alpha, cfg.dropout, "out", tp_group,
                                           weight.dtype, weight.device)
        else:
            adapters[target] = LoRAAdapter(in_local, out_local, cfg.rank, cfg.alpha, cfg.dropout, "in", tp_group,
                                           weight.dtype, weight.device)
    module.lora = tag_component(torch.nn.ModuleDict(adapters), "lora")
    module._lora_original_forward = module.forward
    module._lora_delta = types.MethodType(_fused_delta, module)
    module.forward = types.MethodType(_Adapted.forward, module)
    module.sharded_state_dict = types.MethodType(_lora_sharded_state_dict(module.sharded_state_dict), module)


def _lora_sharded_state_dict(original):
    """The linear's own sharded state dict (which would treat every LoRA tensor as replicated),
    with the adapters' entries sharded along their TP dimension."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = original(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        state = {k: v for k, v in state.items() if ".lora." not in k}
        for target, adapter in self.lora.items():
            tensors = {f"lora.{target}.lora_A": adapter.lora_A, f"lora.{target}.lora_B": adapter.lora_B}
            axis = {f"lora.{target}.lora_B": 0} if adapter.parallel == "out" else {f"lora.{target}.lora_A": 1}
            state.update(make_sharded_tensors_for_checkpoint(
                tensors, prefix, axis, sharded_offsets, tp_group=self.tp_group,
                dp_cp_group=(metadata or {}).get("dp_cp_group")))
        return state

    return sharded_state_dict


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
            targets = grouped.get(path, [])
            module = layer.get_submodule(path)
            if hasattr(module, "lora"):
                raise RuntimeError(f"{path} of layer {layer.layer_number} already has LoRA adapters")
            _adapt_module(module, path, targets, cfg, config, gated)
            if cfg.quantize_base == "nf4":
                from megavlm.peft.nf4 import quantize_module_weight

                quantize_module_weight(module)
            count += 1
    return count


def lora_modules(model):
    return [m for m in model.modules() if hasattr(m, "_lora_layout")]


def full_precision_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors by state-dict name, QLoRA's NF4 base weights dequantised under their
    ``.weight`` names (what an HF export of the base needs)."""
    from megavlm.peft.nf4 import dequantize

    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    for name, module in model.named_modules():
        if getattr(module, "weight_nf4", None) is not None:
            state[f"{name}.weight"] = dequantize(module.weight_nf4)
    return state


@torch.no_grad()
def merge_lora(model) -> None:
    """Fold every adapter into its base weight (W += scale * B @ A) and stop applying it."""
    for module in lora_modules(model):
        if module._lora_merged:
            continue
        if getattr(module, "weight_nf4", None) is not None:
            raise RuntimeError("merging into NF4 base weights would lose precision: merge into a full-precision copy")
        module.weight.add_(_fused_delta_weight(module).to(module.weight.dtype))
        module._lora_merged = True


@torch.no_grad()
def unmerge_lora(model) -> None:
    for module in lora_modules(model):
        if module._lora_merged:
            module.weight.sub_(_fused_delta_weight(module).to(module.weight.dtype))
            module._lora_merged = False
