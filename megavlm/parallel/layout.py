"""Which decoder layers live on which pipeline stage (megatron-core's split rule, without globals)."""
from __future__ import annotations

from megavlm.parallel.init import ParallelLayoutError


def pipeline_layer_ranges(num_layers: int, pp_size: int, first: int | None = None,
                          last: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of the global layer indices held by each stage.

    Even split by default; ``first``/``last`` fix the first/last stage's count and the rest is
    split evenly over the middle stages (megatron-core's num_layers_in_{first,last}_pipeline_stage).
    """
    if pp_size == 1:
        return [(0, num_layers)]
    counts = [None] * pp_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    rest = num_layers - sum(c for c in counts if c is not None)
    free = [i for i, c in enumerate(counts) if c is None]
    if rest < 0 or (free and rest % len(free)) or (not free and rest):
        raise ParallelLayoutError(
            f"{num_layers} decoder layers cannot be split over {pp_size} pipeline stages "
            f"(first_stage_layers={first}, last_stage_layers={last}); set parallel.first_stage_layers / "
            f"parallel.last_stage_layers so the remaining layers divide evenly")
    for i in free:
        counts[i] = rest // len(free)
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges
