"""``megavlm``: one command over the training entry point and the tools in tools/.

Each subcommand runs an existing program with the arguments after it: ``train`` is
``python -m megavlm.train``; the others run ``tools/<name>.py`` of this checkout (so
``python tools/<name>.py`` keeps working and both read the same code). A subcommand whose tool is
not in the checkout yet is listed as not available and says so when called; it appears by itself
when the file lands.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@dataclass(frozen=True)
class Command:
    summary: str
    example: str
    tool: str | None = None      # a file in tools/; None: ``train`` (the megavlm.train module)

    def available(self) -> bool:
        return self.tool is None or (TOOLS / self.tool).is_file()


COMMANDS = {
    "train": Command("train one or more stages from recipes (python -m megavlm.train)",
                     "megavlm train --nproc 2 examples/recipes/quickstart/llava_debug_stage1.yaml"),
    "convert": Command("convert checkpoints between HF and megavlm (tools/convert_checkpoint.py)",
                       "megavlm convert hf-to-megavlm --hf /models/llava-1.5-7b-hf --out ckpt/llava-7b --verify",
                       "convert_checkpoint.py"),
    "evaluate": Command("evaluate a checkpoint on benchmarks (tools/evaluate.py)",
                        "megavlm evaluate --ckpt outputs/quickstart/stage3 --benchmarks ...", "evaluate.py"),
    "generate": Command("answer a prompt about an image with a checkpoint (tools/generate.py)",
                        'megavlm generate --ckpt outputs/quickstart/stage3 --image a.jpg --prompt "What is left?"',
                        "generate.py"),
    "plan": Command("memory, layout, time and cost of a training plan (tools/plan.py)",
                    "megavlm plan examples/recipes/llava_1.5_7b_stage2.yaml", "plan.py"),
    "prepare-data": Command("JSON/JSONL + images -> webdataset shards with an index (tools/prepare_dataset.py)",
                            "megavlm prepare-data --input data/embedded/conversations_train.json "
                            "--format conversations --out data/shards/train", "prepare_dataset.py"),
    "filter-data": Command("CLIP-similarity filtering and de-duplication of a dataset (tools/filter_dataset.py)",
                           "megavlm filter-data --input data/embedded/captions_train.jsonl --format captions "
                           "--clip outputs/clip/debug --out outputs/filtered --min-similarity 0.28",
                           "filter_dataset.py"),
}
BENCHMARKS = {
    "throughput": Command("training tokens/s and MFU, megavlm vs HF (tools/benchmark_throughput.py)",
                          "megavlm bench throughput --flavor llava-1b --batch 8 --seq 2048",
                          "benchmark_throughput.py"),
    "dataloader": Command("image decoding PIL vs DALI, padding with/without packing (tools/benchmark_dataloader.py)",
                          "megavlm bench dataloader --images 256 --workers 1,2", "benchmark_dataloader.py"),
    "peft": Command("full fine-tuning vs LoRA vs QLoRA memory and step time (tools/benchmark_peft.py)",
                    "megavlm bench peft --flavor debug --steps 5", "benchmark_peft.py"),
}


def _listing(commands: dict[str, Command], prefix: str) -> str:
    rows = []
    for name, cmd in commands.items():
        note = "" if cmd.available() else f"   [not available: tools/{cmd.tool} is not in this checkout]"
        rows.append(f"  {prefix}{name:<14} {cmd.summary}{note}")
    return "\n".join(rows)


def usage() -> str:
    return (f"usage: megavlm <command> [arguments]   (megavlm <command> --help for its options)\n\n"
            f"commands:\n{_listing(COMMANDS, '')}\n  bench {{{','.join(BENCHMARKS)}}}\n"
            f"{_listing(BENCHMARKS, '  ')}\n\nexamples:\n  megavlm train --nproc 2 "
            f"examples/recipes/quickstart/llava_debug_stage1.yaml\n  megavlm bench throughput --flavor debug\n")


def _unavailable(name: str, cmd: Command) -> int:
    print(f"megavlm {name}: not available in this checkout (tools/{cmd.tool} does not exist yet)", file=sys.stderr)
    return 2


def _run_tool(name: str, cmd: Command, args: list[str]) -> int:
    """Runs tools/<tool> as its own __main__, with `megavlm <name>` as the program name in its help."""
    if not cmd.available():
        return _unavailable(name, cmd)
    from megavlm.console import setup_entry_point

    setup_entry_point(print_fallbacks=False)
    asks_help = any(a in ("-h", "--help") for a in args)
    path = TOOLS / cmd.tool
    # exec rather than runpy.run_path, which would reset argv[0] (the program name argparse prints)
    sys.argv = [f"megavlm {name}", *args]
    sys.path.insert(0, str(TOOLS))  # as `python tools/<tool>` has it
    code = 0
    try:
        exec(compile(path.read_text(), str(path), "exec"), {"__name__": "__main__", "__file__": str(path)})
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    if asks_help:
        print(f"\nexample:\n  {cmd.example}")
    return code


def _train(args: list[str]) -> int:
    from megavlm import train

    return train.main(args)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, args = argv[0], argv[1:]
    if name == "train":
        return _train(args)
    if name == "bench":
        if not args or args[0] in ("-h", "--help") or args[0] not in BENCHMARKS:
            print(f"usage: megavlm bench {{{','.join(BENCHMARKS)}}} [arguments]\n\n{_listing(BENCHMARKS, '')}\n\n"
                  f"example:\n  {BENCHMARKS['throughput'].example}")
            return 0 if not args or args[0] in ("-h", "--help") else 2
        return _run_tool(f"bench {args[0]}", BENCHMARKS[args[0]], args[1:])
    if name not in COMMANDS:
        print(f"megavlm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return _run_tool(name, COMMANDS[name], args)


if __name__ == "__main__":
    sys.exit(main())
