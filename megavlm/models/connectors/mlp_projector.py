"""LLaVA connectors: 2-layer MLP with GELU (LLaVA-1.5) or a single linear layer (LLaVA-1).

Tensor-parallel like a transformer MLP: the first projection is column-parallel (no gather),
the second row-parallel, so the hidden activation stays sharded and one all-reduce suffices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megavlm.config.model import ConnectorConfig


class MLPProjector(MegatronModule):
    def __init__(self, connector: ConnectorConfig, input_size: int, output_size: int, config: TransformerConfig,
                 tp_group=None):
        super().__init__(config=config)
        self.kind = connector.type
        if self.kind == "mlp2x_gelu":
            self.linear_fc1 = ColumnParallelLinear(input_size, output_size, config=config, init_method=config.init_method,
                                                   bias=connector.bias, gather_output=False, tp_group=tp_group)
            self.linear_fc2 = RowParallelLinear(output_size, output_size, config=config,
                                                init_method=config.output_layer_init_method, bias=connector.bias,
                                                input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        elif self.kind == "linear":
            self.linear_fc1 = ColumnParallelLinear(input_size, output_size, config=config, init_method=config.init_method,
                                                   bias=connector.bias, gather_output=True, tp_group=tp_group)
            self.linear_fc2 = None
        else:
            raise ValueError(f"MLPProjector does not build connector type {self.kind!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, tokens, vision_hidden] -> [n, tokens, llm_hidden]."""
        hidden, _ = self.linear_fc1(features)
        if self.linear_fc2 is None:
            return hidden
        out, _ = self.linear_fc2(F.gelu(hidden))
        return out


class FusedMLPProjector(MLPProjector):
    """The 2-layer projector through the fused Triton kernels (kernels/fused_mlp.py): same
    parameters and tensor parallelism (column-parallel first projection, row-parallel second,
    one all-reduce), the bias + GELU fused into the first GEMM."""

    def __init__(self, connector: ConnectorConfig, input_size: int, output_size: int, config: TransformerConfig,
                 tp_group=None):
        if connector.type != "mlp2x_gelu":
            raise ValueError(f"kernels.connector: triton fuses the mlp2x_gelu projector, not {connector.type!r}")
        super().__init__(connector, input_size, output_size, config, tp_group)
        self.tp_group = self.linear_fc1.tp_group

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        from megavlm.kernels.fused_mlp import fused_mlp

        x = copy_to_tensor_model_parallel_region(features, group=self.tp_group)
        out = fused_mlp(x, self.linear_fc1.weight, self.linear_fc1.bias, self.linear_fc2.weight)
        out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out + self.linear_fc2.bias if self.linear_fc2.bias is not None else out
