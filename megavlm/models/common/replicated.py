"""A vision-side module (the ViT, the Q-Former, the Perceiver resampler) kept whole on every
tensor-parallel rank while the LLM is split (``vision.tensor_parallel: 1``, ``connector.
tensor_parallel: 1``): any head count runs, at the price of every TP rank computing all of it.

* Its layers are built for TP=1 over the process's own size-1 group (``pg_collection.solo``).
* Its parameters start equal on all TP ranks (broadcast from TP rank 0 after initialisation).
* Its gradients need no reduction over TP: its output reaches the split model only through
  column-parallel inputs (the LLM's layers, the connector's projection, the cross-attention's
  key/value projection), whose backward all-reduces the input gradient, so it is whole and equal
  on every TP rank. DDP reduces them over DP like any parameter.
* Its parameters are marked as TP duplicates (``tensor_model_parallel = False``), so the gradient
  norm counts them on TP rank 0 only, not once per rank.
* Checkpoints: every TP rank holds the same tensors; their replica ids carry the real TP rank, so
  exactly one of them writes each tensor.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import torch
import torch.distributed as dist


def whole_parallel(parallel):
    """The ParallelConfig a whole module's TransformerConfig is made from."""
    return dataclasses.replace(parallel, tensor_parallel=1, sequence_parallel=False)


def build_replicated(vit_cls: type, model, parallel, pg_collection, dtype, recompute, layer_spec, norm):
    """The ViT, whole on every TP rank."""
    from megavlm.models.common.transformer_config import vision_transformer_config

    config = vision_transformer_config(model, whole_parallel(parallel), dtype, recompute)
    solo = copy.copy(pg_collection)
    solo.tp = pg_collection.solo
    return build_whole(vit_cls, pg_collection, model.vision, config, layer_spec, norm, solo)


def build_whole(cls: type, pg_collection, *args, **kwargs):
    """``cls(*args, **kwargs)`` (built for TP=1 over ``pg_collection.solo``) whole on every TP rank."""
    module = replicated_class(cls)(*args, **kwargs)
    module.replica_group = pg_collection.tp
    _replicate(module, pg_collection.tp)
    return module


@torch.no_grad()
def _replicate(module: torch.nn.Module, tp_group) -> None:
    src = dist.get_global_rank(tp_group, 0) if tp_group.size() > 1 else None
    for param in module.parameters():
        if src is not None:
            dist.broadcast(param.data, src=src, group=tp_group)
        param.tensor_model_parallel = False


@functools.lru_cache(maxsize=None)
def replicated_class(cls: type) -> type:
    class Replicated(cls):
        """``cls`` whole on every TP rank (see the module docstring)."""

        def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
            from megatron.core.dist_checkpointing.dict_utils import nested_values

            state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
            tp_rank = self.replica_group.rank()
            for item in nested_values(state):
                replica = getattr(item, "replica_id", None)
                if isinstance(replica, tuple) and len(replica) == 3:
                    item.replica_id = (replica[0], tp_rank, replica[2])
            return state

    Replicated.__name__ = Replicated.__qualname__ = f"TPReplicated{cls.__name__}"
    return Replicated
