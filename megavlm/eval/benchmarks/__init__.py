"""The benchmarks by name. Each reads a local copy in its published format (nothing is
downloaded); ``embedded`` writes small versions of every one from scenes of known content."""
from __future__ import annotations

from megavlm.eval.benchmarks.base import Benchmark, BenchmarkError, Sample
from megavlm.eval.benchmarks.captions import Captions
from megavlm.eval.benchmarks.multiple_choice import MMBench, ScienceQA, SEEDBench
from megavlm.eval.benchmarks.pope import POPE
from megavlm.eval.benchmarks.refcoco import RefCOCO
from megavlm.eval.benchmarks.retrieval import Retrieval
from megavlm.eval.benchmarks.vqa import VQA

_FACTORIES = {
    "vqav2": lambda: VQA("vqav2"), "okvqa": lambda: VQA("okvqa"), "textvqa": lambda: VQA("textvqa"),
    "coco_captions": lambda: Captions("coco_captions"), "flickr30k_captions": lambda: Captions("flickr30k_captions"),
    "nocaps": lambda: Captions("nocaps"),
    "pope": POPE,
    "mmbench": MMBench, "seedbench": SEEDBench, "scienceqa": ScienceQA,
    "refcoco": lambda: RefCOCO("refcoco"), "refcoco+": lambda: RefCOCO("refcoco+"),
    "refcocog": lambda: RefCOCO("refcocog"),
    "flickr30k_retrieval": lambda: Retrieval("flickr30k_retrieval"),
    "coco_retrieval": lambda: Retrieval("coco_retrieval"),
}
BENCHMARK_NAMES = tuple(_FACTORIES)


def get_benchmark(name: str) -> Benchmark:
    if name not in _FACTORIES:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_NAMES)}")
    return _FACTORIES[name]()


__all__ = ["Benchmark", "BenchmarkError", "Sample", "get_benchmark", "BENCHMARK_NAMES"]
