"""Standard benchmarks on a model of any TP/PP/DP layout: every benchmark is loaded (and its
errors raised) before anything runs; samples are split over data-parallel ranks without
duplicates, answered greedily with the KV cache, gathered, scored with and without the image
(a blank image: the floor a model that ignores the image reaches) and reported as a table,
a results JSON, per-sample answers and TensorBoard scalars."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megavlm.data.augment import ImageAug
from megavlm.data.build import encoder_for, image_backend
from megavlm.data.collate import image_inputs
from megavlm.data.images import blank_like
from megavlm.data.templates import BadSample, get_template
from megavlm.data.tokenizer import IMAGE_TOKEN
from megavlm.eval.benchmarks import Benchmark, BenchmarkError, Sample, get_benchmark
from megavlm.eval.generate import SamplingConfig, generate
from megavlm.training.stages import set_train_mode


@dataclass
class LoadedBenchmark:
    benchmark: Benchmark
    path: str
    samples: list[Sample]


@dataclass
class Answered:
    """This rank's answers to its share of one benchmark."""
    answers: dict[int, str] = field(default_factory=dict)    # sample index -> generated text
    skipped: dict[str, int] = field(default_factory=dict)    # reason -> count


def load_benchmarks(specs) -> list[LoadedBenchmark]:
    """Every ``{name, path, max_samples}`` loaded, or a BenchmarkError naming the benchmark, file
    and record; ``max_samples`` keeps the first N questions (of each subset, e.g. POPE's splits)
    with all their variants (MMBench's rotations)."""
    loaded = []
    for spec in specs:
        benchmark = get_benchmark(spec.name)
        path = Path(spec.path)
        if not path.exists():
            raise BenchmarkError(f"{spec.name}: {path} does not exist")
        samples = benchmark.load(path)
        if spec.max_samples is not None:
            samples = _first_questions(samples, spec.max_samples)
        ids = [s.sample_id for s in samples]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise BenchmarkError(f"{spec.name}: sample id {dup!r} occurs more than once in {path}")
        loaded.append(LoadedBenchmark(benchmark, str(path), samples))
    return loaded


def _first_questions(samples: list[Sample], limit: int) -> list[Sample]:
    keep: dict = {}
    for s in samples:
        subset = keep.setdefault(s.meta.get("split"), {})
        question = s.meta.get("question", s.sample_id)
        if len(subset) < limit:
            subset.setdefault(question, True)
    return [s for s in samples if s.meta.get("question", s.sample_id) in keep[s.meta.get("split")]]


def _image_bytes(sample: Sample) -> bytes:
    if isinstance(sample.image, bytes):
        return sample.image
    path = Path(sample.image)
    if not path.is_file():
        raise BadSample("missing_image", f"sample {sample.sample_id}: image {path} does not exist")
    return path.read_bytes()


class _Prompter:
    """Sample -> (prompt ids, ViT inputs) with the recipe's chat template and image layout."""

    def __init__(self, ctx, template: str, max_new_tokens: int):
        self.ctx, self.max_new_tokens = ctx, max_new_tokens
        self.encoder = encoder_for(ctx.model_cfg, ctx.tokenizer, template)
        self.backend = image_backend(ctx.model_cfg)

    def __call__(self, sample: Sample):
        data, aug, views = _image_bytes(sample), ImageAug(), 1
        if self.ctx.tiler is not None:
            aug, views = self.ctx.tiler.plan(data, aug, sample.sample_id, str(sample.image)[:80])
        prompt = self.encoder.encode_prompt([], f"{IMAGE_TOKEN}\n{sample.question}", 1, sample.sample_id, [views])
        if len(prompt) + self.max_new_tokens > self.ctx.model_cfg.language.max_seq_len:
            raise BadSample("over_length", f"sample {sample.sample_id}: a {len(prompt)}-token prompt")
        pixels = self.backend.decode([(data, aug, sample.sample_id, "benchmark image")])[0]
        if isinstance(pixels, BadSample):
            raise pixels
        return prompt, image_inputs(pixels)


def end_of_answer_ids(tokenizer, template: str) -> set[int]:
    """EOS, and the template's end-of-turn marker when it is a single token."""
    ids = {tokenizer.eos_id}
    end = get_template(template).end
    marker = tokenizer.token_id(end) if end != "<eos>" and hasattr(tokenizer, "token_id") else None
    if marker is not None:
        ids.add(marker)
    return ids


def answer_share(ctx, loaded: LoadedBenchmark, indices: list[int], template: str, blank: bool,
                 progress=None) -> Answered:
    """Generate the answers of ``indices`` (this rank's share), micro-batch by micro-batch."""
    bench = loaded.benchmark
    prompter = _Prompter(ctx, template, bench.max_new_tokens)
    sampling = SamplingConfig(max_new_tokens=bench.max_new_tokens)
    eos = end_of_answer_ids(ctx.tokenizer, template)
    out = Answered()
    cfg = ctx.model_cfg
    for start in range(0, len(indices), ctx.micro_batch_size):
        rows, prompts, pixels = [], [], []
        for index in indices[start: start + ctx.micro_batch_size]:
            try:
                prompt, image = prompter(loaded.samples[index])
            except BadSample as err:
                out.skipped[err.reason] = out.skipped.get(err.reason, 0) + 1
                continue
            rows.append(index)
            prompts.append(prompt)
            pixels.append(blank_like(image, cfg.image_mean, cfg.image_std) if blank else image)
        if rows:
            texts = generate(ctx.model_chunks, prompts, torch.cat(pixels), [p.shape[0] for p in pixels], ctx.head,
                             ctx.tokenizer, sampling, eos_ids=eos, banned=ctx.model_cfg.placeholder_ids,
                             seeds=rows)
            out.answers.update({i: g.text for i, g in zip(rows, texts)})
        if progress is not None:
            progress(len(indices[start: start + ctx.micro_batch_size]))
    return out


def _gather(answered: Answered, dp_group) -> Answered:
    """All DP ranks' answers (disjoint shares) and skip counts, on every rank."""
    if dp_group is None or not dist.is_initialized() or dist.get_world_size(dp_group) == 1:
        return answered
    parts = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(parts, (answered.answers, answered.skipped), group=dp_group)
    merged = Answered()
    for answers, skipped in parts:
        merged.answers.update(answers)
        for reason, count in skipped.items():
            merged.skipped[reason] = merged.skipped.get(reason, 0) + count
    return merged


def score(loaded: LoadedBenchmark, answered: Answered) -> dict:
    """Metrics over the answered samples (in benchmark order); "no samples" when none was."""
    bench = loaded.benchmark
    order = sorted(answered.answers)
    samples = [loaded.samples[i] for i in order]
    predictions = [bench.extract(answered.answers[i], s) for i, s in zip(order, samples)]
    metrics = bench.score(samples, predictions) if samples else {}
    answers = [{"sample_id": s.sample_id, "answer": answered.answers[i], "prediction": p}
               for i, s, p in zip(order, samples, predictions)]
    return {"metrics": metrics, "samples": len(samples), "skipped": dict(answered.skipped), "answers": answers}


def run_benchmarks(ctx, loaded: list[LoadedBenchmark], template: str, dp_rank: int = 0, dp_size: int = 1,
                   dp_group=None, blank_baseline: bool = True, show_progress: bool = False) -> dict:
    """{benchmark: {"image": result, "blank": result}} (results identical on every rank)."""
    for chunk in ctx.model_chunks:
        set_train_mode(chunk, False)
    results, bar = {}, _Progress(show_progress, sum(len(lb.samples) for lb in loaded if lb.benchmark.kind == "generate")
                                 * (2 if blank_baseline else 1))
    try:
        for lb in loaded:
            if lb.benchmark.kind != "generate":
                results[lb.benchmark.name] = {"image": _retrieval(ctx, lb)}
                continue
            share = list(range(dp_rank, len(lb.samples), dp_size))
            results[lb.benchmark.name] = {}
            for variant in ("image", "blank") if blank_baseline else ("image",):
                bar.describe(f"{lb.benchmark.name} ({variant})")
                answered = answer_share(ctx, lb, share, template, variant == "blank", bar.advance)
                results[lb.benchmark.name][variant] = score(lb, _gather(answered, dp_group))
    finally:
        bar.close()
    return results


def _retrieval(ctx, lb: LoadedBenchmark) -> dict:
    """Image-text retrieval by a contrastive model's embeddings, or by BLIP-2's ITC and ITM."""
    if ctx.model_cfg.head == "contrastive":
        from megavlm.eval.contrastive import contrastive_metrics_for_samples as metrics_for_samples
    else:
        from megavlm.eval.retrieval import retrieval_metrics_for_samples as metrics_for_samples

    metrics, skipped = metrics_for_samples(ctx, lb.samples)
    return {"metrics": metrics, "samples": len(lb.samples) - sum(skipped.values()), "skipped": skipped, "answers": []}


class _Progress:
    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("benchmarks", total=total)

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---- reporting ---------------------------------------------------------------------------------
def flat_metrics(results: dict) -> dict[str, float]:
    """{"<benchmark>/<metric>": value, ... "<benchmark>/<metric>_blank": value} for logs."""
    flat = {}
    for name, variants in results.items():
        for variant, result in variants.items():
            suffix = "_blank" if variant == "blank" else ""
            for metric, value in result["metrics"].items():
                flat[f"{name}/{metric}{suffix}"] = value
            if variant == "image":
                flat[f"{name}/samples"] = float(result["samples"])
                flat[f"{name}/skipped"] = float(sum(result["skipped"].values()))
    return flat


def format_table(results: dict) -> str:
    """One row per benchmark metric: with the image, with a blank image, samples, skipped."""
    rows = [("benchmark", "metric", "image", "blank image", "samples", "skipped")]
    for name, variants in results.items():
        image, blank = variants["image"], variants.get("blank")
        skipped = ", ".join(f"{k} {v}" for k, v in image["skipped"].items()) or "0"
        if not image["metrics"]:
            rows.append((name, "-", "no samples", "", str(image["samples"]), skipped))
            continue
        for metric, value in image["metrics"].items():
            other = blank["metrics"].get(metric) if blank else None
            rows.append((name, metric, _fmt(value), _fmt(other) if other is not None else "",
                         str(image["samples"]), skipped))
            name, skipped = "", ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def _fmt(value: float) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"


def write_results(results: dict, out_dir: Path, extra: dict | None = None) -> Path:
    """results.json (metrics, counts) and answers_<benchmark>[_blank].jsonl (per sample)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, variants in results.items():
        summary[name] = {v: {k: r[k] for k in ("metrics", "samples", "skipped")} for v, r in variants.items()}
        for variant, result in variants.items():
            suffix = "" if variant == "image" else f"_{variant}"
            with open(out_dir / f"answers_{name}{suffix}.jsonl", "w") as f:
                for row in result["answers"]:
                    f.write(json.dumps(row) + "\n")
    path = out_dir / "results.json"
    path.write_text(json.dumps(dict(extra or {}, benchmarks=summary), indent=2))
    return path
