"""What every family's HF state-dict adapter shares: between per-process shards and the full form
through ``self.plan`` (models/common/sharding.py). A family adds ``hf_to_full`` / ``full_to_hf``
(the name mapping) and sets ``self.model`` and ``self.plan``."""
from __future__ import annotations


class ShardedAdapter:
    model = None
    plan = None

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
