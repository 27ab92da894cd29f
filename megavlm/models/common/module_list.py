"""A ModuleList that dist checkpointing sees into.

megatron-core's default for a child without ``sharded_state_dict`` (a plain ``torch.nn.ModuleList``)
saves its tensors as *replicated*: under TP > 1 the layers' column/row-parallel shards would be
written once, from one rank, with their local shapes, and every rank would load that rank's
shard. ``ShardedModuleList`` asks each member for its own sharded state dict instead."""
from __future__ import annotations

import torch


class ShardedModuleList(torch.nn.ModuleList):
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        from megatron.core.transformer.utils import sharded_state_dict_default

        state: dict = {}
        for index, module in enumerate(self):
            state.update(sharded_state_dict_default(module, f"{prefix}{index}.", sharded_offsets, metadata))
        return state
