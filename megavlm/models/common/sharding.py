"""Tensor- and pipeline-parallel sharding of megavlm state dicts, shared by every family's adapter.

A *full* state dict uses megavlm names with global decoder-layer indices and unsharded tensors in
megatron-core's layouts (fused QKV interleaved per query group, ``[gate; up]`` for SwiGLU). A
*local* state dict is what one (tp_rank, pp_rank) process's model holds. ``ShardingPlan`` moves
between the two, so HF conversion is written once per family, against the full form.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from megavlm.parallel.layout import pipeline_layer_ranges

# Megatron-core's parallel linears: column-parallel weights/biases split dim 0, row-parallel weights
# split dim 1 (their biases are replicated). Matched against the key's last two name components.
_COLUMN = re.compile(r"(linear_qkv|linear_q|linear_kv|linear_fc1|language_projection)\.(weight|bias)$")
# A QK-norm over all heads' channels (InternViT's) splits by heads; one over each head's channels
# (Persimmon's) is the same on every rank.
_QK_NORM = re.compile(r"self_attention\.[qk]_layernorm\.weight$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")
_VOCAB = re.compile(r"((word_embeddings|output_layer)\.weight|itg_bias)$")
# LoRA adapters split like the layer they adapt: B with a column-parallel layer's rows, A with a
# row-parallel layer's input columns; the other factor is replicated.
_LORA_COLUMN = re.compile(r"(linear_qkv|linear_fc1)\.lora\.\w+\.lora_B$")
_LORA_ROW = re.compile(r"(linear_proj|linear_fc2)\.lora\.\w+\.lora_A$")


@dataclass
class ShardingPlan:
    tp_size: int = 1
    pp_size: int = 1
    num_layers: int = 0                      # decoder layers of the pipelined model
    vocab_size: int = 0                      # true vocabulary (padding added for TP)
    layer_prefix: str = "language_model.decoder.layers."
    first_stage_prefixes: tuple[str, ...] = ("vision.", "connector.", "language_model.embedding.")
    last_stage_prefixes: tuple[str, ...] = ("language_model.decoder.final_layernorm.", "language_model.output_layer.")
    gated_prefixes: tuple[str, ...] = ("language_model.",)  # whose linear_fc1 holds [gate; up]
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    # Other vocab-parallel tables and their true sizes, by key prefix (e.g. the Q-Former's).
    extra_vocab: dict[str, int] = field(default_factory=dict)
    # Modules whole on every TP rank (vision.tensor_parallel: 1): never split
    whole_prefixes: tuple[str, ...] = ()
    # Modules whose QK-norm spans all heads' channels (split by heads); elsewhere it is per head
    full_width_qk_norm: tuple[str, ...] = ("vision.",)
    ranges: list[tuple[int, int]] = field(init=False)

    def __post_init__(self):
        self.ranges = pipeline_layer_ranges(self.num_layers, self.pp_size, self.first_stage_layers,
                                            self.last_stage_layers)

    # ---- pipeline placement -------------------------------------------------------------
    def _layer_of(self, key: str) -> tuple[int, str] | None:
        if not key.startswith(self.layer_prefix):
            return None
        index, rest = key[len(self.layer_prefix):].split(".", 1)
        return int(index), rest

    def stages_of(self, key: str) -> list[int]:
        """Pipeline stages that hold ``key`` (full name)."""
        layer = self._layer_of(key)
        if layer is not None:
            return [s for s, (a, b) in enumerate(self.ranges) if a <= layer[0] < b]
        if key.startswith(self.first_stage_prefixes):
            return [0]
        if key.startswith(self.last_stage_prefixes):
            return [self.pp_size - 1]
        raise KeyError(f"no pipeline placement rule for state-dict key {key!r}")

    def local_key(self, key: str, pp_rank: int) -> str:
        layer = self._layer_of(key)
        if layer is None:
            return key
        return f"{self.layer_prefix}{layer[0] - self.ranges[pp_rank][0]}.{layer[1]}"

    def global_key(self, key: str, pp_rank: int) -> str:
        layer = self._layer_of(key)
        if layer is None:
            return key
        return f"{self.layer_prefix}{layer[0] + self.ranges[pp_rank][0]}.{layer[1]}"

    # ---- tensor-parallel split ----------------------------------------------------------
    def _vocab(self, key: str) -> int:
        return next((v for prefix, v in self.extra_vocab.items() if key.startswith(prefix)), self.vocab_size)

    def _rule(self, key: str) -> str:
        if key.startswith(self.whole_prefixes):
            return "replicated"
        if ".lora." in key:
            return "column" if _LORA_COLUMN.search(key) else "row" if _LORA_ROW.search(key) else "replicated"
        if _VOCAB.search(key):
            return "vocab"
        if _QK_NORM.search(key):
            return "column" if key.startswith(self.full_width_qk_norm) else "replicated"
        if _COLUMN.search(key):
            gated = key.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")) and key.startswith(self.gated_prefixes)
            return "glu" if gated else "column"
        if _ROW.search(key):
            return "row"
        return "replicated"

    def split(self, key: str, tensor: torch.Tensor, tp_rank: int) -> torch.Tensor:
        rule, tp = self._rule(key), self.tp_size
        if rule == "replicated" or tp == 1 and rule != "vocab":
            return tensor
        if rule == "vocab":
            vocab = self._vocab(key)
            padded = -(-vocab // tp) * tp
            if tensor.shape[0] != vocab:
                raise ValueError(f"{key}: {tensor.shape[0]} rows, expected the vocabulary size {vocab}")
            if padded != tensor.shape[0]:
                tensor = torch.cat([tensor, tensor.new_zeros(padded - tensor.shape[0], *tensor.shape[1:])])
            return tensor.chunk(tp, 0)[tp_rank]
        dim = 1 if rule == "row" else 0
        if tensor.shape[dim] % (2 * tp if rule == "glu" else tp):
            raise ValueError(f"{key}: dimension {dim} of size {tensor.shape[dim]} is not divisible by TP={tp}"
                             + (" (x2 for the gate and up halves)" if rule == "glu" else ""))
        if rule == "glu":
            gate, up = tensor.chunk(2, 0)
            return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]])
        return tensor.chunk(tp, dim)[tp_rank]

    def merge(self, key: str, shards: list[torch.Tensor]) -> torch.Tensor:
        rule = self._rule(key)
        if rule == "replicated" or len(shards) == 1 and rule != "vocab":
            return shards[0]
        if rule == "vocab":
            return torch.cat(shards)[: self._vocab(key)]
        if rule == "glu":
            gates, ups = zip(*(s.chunk(2, 0) for s in shards))
            return torch.cat([*gates, *ups])
        return torch.cat(shards, 0 if rule == "column" else 1)

    # ---- whole state dicts --------------------------------------------------------------
    def shard(self, full: dict[str, torch.Tensor], tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
        """The local state dict of process (tp_rank, pp_rank). A TP slice is copied out of the
        full tensor (so the full one can be freed); a whole tensor is passed on, not copied."""
        local = {}
        for key, tensor in full.items():
            if pp_rank in self.stages_of(key):
                part = self.split(key, tensor, tp_rank)
                local[self.local_key(key, pp_rank)] = part if part is tensor else part.clone()
        return local

    def unshard(self, shards: dict[tuple[int, int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Merge every process's local state dict, keyed by (tp_rank, pp_rank), into the full one."""
        missing = [(t, p) for t in range(self.tp_size) for p in range(self.pp_size) if (t, p) not in shards]
        if missing:
            raise ValueError(f"unshard needs every (tp_rank, pp_rank); missing {missing}")
        full: dict[str, torch.Tensor] = {}
        for pp_rank in range(self.pp_size):
            for key in shards[(0, pp_rank)]:
                name = self.global_key(key, pp_rank)
                if name not in full:  # a tied output layer also sits on the last stage
                    full[name] = self.merge(name, [shards[(t, pp_rank)][key] for t in range(self.tp_size)])
        return full


# ---- HF <-> megatron layouts ----------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF q/k/v projections (weights [out, in] or biases [out]) -> megatron's fused QKV, which
    interleaves per query group: [q heads of group 0, k0, v0, q heads of group 1, k1, v1, ...]."""
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups, head_dim, *rest)
    k = k.reshape(num_groups, 1, head_dim, *rest)
    v = v.reshape(num_groups, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def pad_heads(tensor: torch.Tensor, heads: int, padded: int, dim: int = 0) -> torch.Tensor:
    """Append zero dummy heads along ``dim`` (head-major, like HF's q/k/v rows and o_proj columns)."""
    if padded == heads:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = shape[dim] // heads * (padded - heads)
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)


def strip_heads(tensor: torch.Tensor, heads: int, padded: int, dim: int = 0) -> torch.Tensor:
    """Inverse of pad_heads: the real heads' part."""
    return tensor.narrow(dim, 0, tensor.shape[dim] // padded * heads)


def fuse_kv(k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate key/value projections -> ParallelAttention's linear_kv, interleaved per head."""
    rest = k.shape[1:]
    head_dim = k.shape[0] // num_heads
    return torch.stack([k.reshape(num_heads, head_dim, *rest), v.reshape(num_heads, head_dim, *rest)], 1).reshape(-1, *rest)


def split_kv(kv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    rest = kv.shape[1:]
    grouped = kv.reshape(num_heads, 2, -1, *rest)
    return grouped[:, 0].reshape(-1, *rest), grouped[:, 1].reshape(-1, *rest)


def fuse_padded_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, padded: int) -> torch.Tensor:
    """Multi-head HF q/k/v -> megatron's fused QKV with zero dummy heads up to ``padded``."""
    return fuse_qkv(*(pad_heads(t, heads, padded) for t in (q, k, v)), padded, padded)


def split_padded_qkv(qkv: torch.Tensor, heads: int, padded: int) -> tuple[torch.Tensor, ...]:
    """Inverse of fuse_padded_qkv: the real heads' q, k, v."""
    return tuple(strip_heads(t, heads, padded) for t in split_qkv(qkv, padded, padded))


def fuse_padded_kv(k: torch.Tensor, v: torch.Tensor, heads: int, padded: int) -> torch.Tensor:
    """fuse_kv with zero dummy heads up to ``padded``."""
    return fuse_kv(pad_heads(k, heads, padded), pad_heads(v, heads, padded), padded)


def split_padded_kv(kv: torch.Tensor, heads: int, padded: int) -> tuple[torch.Tensor, ...]:
    return tuple(strip_heads(t, heads, padded) for t in split_kv(kv, padded))


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    per_group = num_heads // num_groups + 2
    head_dim = qkv.shape[0] // (num_groups * per_group)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, per_group, head_dim, *rest)
    q = grouped[:, :-2].reshape(-1, *rest)
    k = grouped[:, -2].reshape(-1, *rest)
    v = grouped[:, -1].reshape(-1, *rest)
    return q, k, v
