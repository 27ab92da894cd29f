"""What every family's HF state-dict adapter shares: between per-process shards and the full form
through ``self.plan`` (models/common/sharding.py). A family adds ``hf_to_full`` / ``full_to_hf``
(the name mapping) and sets ``self.model`` and ``self.plan``."""
from __future__ import annotations


# Each LoRA target's module inside an HF Llama/Qwen2 decoder layer, and inside an OPT one.
LLAMA_LORA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                      "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
OPT_LORA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"}


class ShardedAdapter:
    model = None
    plan = None
    # Module path of the decoder layers in the family's HF class (None: no HF decoder), and each
    # LoRA target's module in one of them: how PEFT names exported adapters.
    hf_decoder_layers: str | None = None
    hf_lora_modules: dict[str, str] = LLAMA_LORA_MODULES

    def hf_to_megavlm(self, hf: dict, tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The local state dict of process (tp_rank, pp_rank), ready for ``model.load_state_dict``."""
        return self.plan.shard(self.hf_to_full(hf), tp_rank, pp_rank)

    def megavlm_to_hf(self, shards: dict) -> dict:
        """shards: {(tp_rank, pp_rank): local state dict} -> HF state dict."""
        shards = {k: {n: t for n, t in sd.items() if not n.endswith("_extra_state")} for k, sd in shards.items()}
        full = self.plan.unshard(shards)
        if self.model.language.tie_embeddings:
            full.pop("language_model.output_layer.weight", None)
        return self.full_to_hf(full)
