#!/usr/bin/env python
"""Every GPU check of megavlm in one run, within a time budget; tables to stdout, results to
benchmarks/results/<date>-<gpu>.json and .md (and to $OUT when set).

    python tools/gpu/verify_all.py [--budget-s 450] [--only correctness,throughput] [--budget throughput=300]
    python tools/gpu/verify_all.py --cpu-dry-run       # the same code on a CPU at tiny shapes

Normally started by tools/gpu/verify_all.sh, which installs the carried wheels first. Sections,
in order (each in its own process, stopped at its share of the budget; finished rows are kept):
  env          versions, the card, whether Transformer Engine and DALI import
  correctness  LLaVA debug logits on the GPU (fp32, bf16; local and TE specs) vs the same weights
               in fp32 on the CPU; the Triton kernels vs fp32 references at real shapes in bf16
  throughput   tools/benchmark_throughput.py, llava-1b 8 x 2048, stages 1 and 2: ours bf16, ours
               FP8 (delayed, current scaling), HF eager, HF + torch.compile, ours bf16 on TE
  fp8          50 steps bf16 vs FP8 (delayed, current) from the same weights, max rel. loss diff
  kernels      fused CE, fused linear-CE, fused connector vs eager and torch.compile: time, memory
  data         DALI mixed (nvJPEG) decode + resize + crop vs PIL in 16 processes, generated JPEGs
  profile      where ours' stage-2 step spends its GPU time (GEMMs, attention, loss, optimizer...)
The dry run skips what needs the GPU itself: Transformer Engine (no CPU build), nvJPEG and the CUDA
memory figures; and, unless --with-compile, HF + torch.compile (inductor on a small CPU needs
minutes for that model; the kernels' compiled baselines run in seconds and always run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import verify_sections as vs  # noqa: E402

# Seconds per section on the GPU; shares of what is left when time runs short.
# Estimates for an H100/H200 (not yet timed there): model builds ~5-10 s, a llava-1b step < 1 s,
# torch.compile tens of seconds per graph. Sum 450 s: an 8-minute call less the wheel install.
BUDGETS = {"env": 15, "correctness": 35, "throughput": 240, "fp8": 55, "kernels": 60, "data": 20, "profile": 25}
DRY_BUDGETS = {"env": 150, "correctness": 300, "throughput": 900, "fp8": 300, "kernels": 300, "data": 150,
               "profile": 200}
GRACE_S = 15      # a section past its share gets this long to stop before it is killed
ALLOWED_DRY_SKIPS = ("Transformer Engine not importable", "DALI not importable")


def section_budgets(names: list[str], budgets: dict[str, float], left: float) -> dict[str, float]:
    """Each section's share of ``left``, in proportion to its budget; used up front only to print."""
    total = sum(budgets[n] for n in names) or 1.0
    return {n: left * budgets[n] / total if left < total else budgets[n] for n in names}


def run_section(name: str, dry: bool, allowed: float, with_compile: bool = False) -> dict:
    """Run one section in a child process for at most ``allowed`` seconds (+ grace); its rows."""
    rows_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"verify-{os.getpid()}-{name}.jsonl"
    rows_file.unlink(missing_ok=True)
    deadline = time.time() + allowed
    cmd = [sys.executable, __file__, "--section", name, "--rows", str(rows_file), "--deadline", str(deadline)]
    cmd += ["--cpu-dry-run"] if dry else []
    cmd += ["--with-compile"] if with_compile else []
    start = time.time()
    status, tail = "ok", ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=allowed + GRACE_S)
        if proc.returncode:
            status, tail = "error", (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        status, tail = "timed out", ((err.stdout or b"").decode(errors="replace") +
                                     (err.stderr or b"").decode(errors="replace"))[-1500:]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    rows_file.unlink(missing_ok=True)
    return {"status": status, "elapsed_s": round(time.time() - start, 1), "allowed_s": round(allowed, 1),
            "rows": rows, "log_tail": tail}


def child(args) -> None:
    """One section, rows appended to --rows as JSON lines as they finish."""
    plan = vs.Plan.for_mode(args.cpu_dry_run, compile_on_cpu=args.with_compile)
    if plan.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    with open(args.rows, "a") as out:
        def emit(row: dict) -> None:
            out.write(json.dumps(row, default=str) + "\n")
            out.flush()
            print(json.dumps(row, default=str)[:300], flush=True)

        vs.SECTIONS[args.section](plan, emit, args.deadline)


# ---- tables -----------------------------------------------------------------------------------
def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _throughput_row(r: dict) -> list[str]:
    mfu = r.get("real_mfu", r.get("mfu"))
    return [r.get("label", "?"), str(r.get("stage", "?")), _fmt(vs.tokens_per_s(r), ",.0f"),
            _fmt(r.get("padding_fraction"), ".1%"), _fmt(mfu * 100 if mfu else None, ".1f"),
            _fmt(r.get("peak_mib"), ",.0f"), _fmt(r.get("step_s"), ".3f"), _fmt(r.get("vs_hf"), ".2f"),
            _fmt(r.get("target_vs_hf"), ".1f"), _fmt(r.get("met"))]


TABLES = {  # section -> (columns, row -> cells) for rows that ran; skipped/error rows are listed apart
    "env": (["key", "value"], None),
    "correctness": (["check", "rel err (out)", "grad rel err", "eager's errors", "max abs", "top-1", "tol", "ok"],
                    lambda r: [r["check"], _fmt(r.get("rel_err", r.get("out_rel_err")), ".2e"),
                               _fmt(r.get("grad_rel_err"), ".2e"),
                               (f"{r['eager_out_rel_err']:.1e} / {r['eager_grad_rel_err']:.1e}"
                                if "eager_out_rel_err" in r else "-"),
                               _fmt(r.get("max_abs_err"), ".2e"), _fmt(r.get("top1_agree"), ".3f"),
                               _fmt(r.get("tolerance"), ".0e") if "tolerance" in r else "<= 2x eager",
                               _fmt(r.get("ok"))]),
    "throughput": (["run", "stage", "tokens/s", "padding", "MFU %", "peak MiB", "step s", "x HF eager", "target",
                    "met"], _throughput_row),
    "fp8": (["run", "steps", "first loss", "last loss", "max rel loss diff", "at step", "finite", "ok"],
            lambda r: [r["run"], _fmt(r.get("steps")), _fmt(r.get("first_loss"), ".4f"), _fmt(r.get("last_loss"), ".4f"),
                       _fmt(r.get("max_rel_loss_diff"), ".2e"), _fmt(r.get("step_of_max")), _fmt(r.get("finite")),
                       _fmt(r.get("ok"))]),
    "kernels": (["op", "impl", "ms", "x eager", "peak MiB", "mem / eager", "target", "met"],
                lambda r: [r["op"], r["impl"], _fmt(r.get("ms"), ".3f"), _fmt(r.get("x_eager"), ".2f"),
                           _fmt(r.get("peak_mib"), ",.1f"), _fmt(r.get("mem_vs_eager"), ".3f"), _fmt(r.get("target")),
                           _fmt(r.get("met"))]),
    "data": (["decoder", "images", "images/s", "x PIL", "target", "met"],
             lambda r: [r["decoder"], _fmt(r.get("images")), _fmt(r.get("images_per_s"), ",.0f"),
                        _fmt(r.get("vs_pil"), ".2f"), _fmt(r.get("target_vs_pil"), ".1f"), _fmt(r.get("met"))]),
    "profile": (["where", "category", "ms / step", "share"],
                lambda r: [r.get("top_kernel", "all kernels"), r["category"], _fmt(r["ms_per_step"], ".2f"),
                           _fmt(r["share"], ".1%")]),
}


def _is_skip(r: dict) -> bool:
    return "skipped" in r or "error" in r


def table_lines(name: str, section: dict, markdown: bool) -> list[str]:
    columns, cells = TABLES[name]
    rows = section["rows"]
    if name == "env":
        data = [[k, _fmt(v)] for r in rows for k, v in r.items()]
    else:
        data = [cells(r) for r in rows if not _is_skip(r)]
    out = []
    if data:
        if markdown:
            out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in data]
        else:
            widths = [max(len(c), *(len(row[i]) for row in data)) for i, c in enumerate(columns)]
            out += ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
            out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in data]
    for r in (r for r in rows if _is_skip(r)):
        what = " ".join(str(r[k]) for k in ("label", "check", "run", "op", "impl", "decoder") if k in r)
        what += f" stage {r['stage']}" if "stage" in r else ""
        out.append(f"{'- ' if markdown else '  '}{what}: {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
    if section["status"] != "ok":
        out.append(f"{'- ' if markdown else '  '}section {section['status']} after {section['elapsed_s']} s "
                   f"(allowed {section['allowed_s']} s)")
        if section["status"] == "error" and not markdown:
            out.append(section["log_tail"])
    return out


def render_markdown(results: dict) -> str:
    lines = [f"# GPU verification, {results['date']}: {results['device']}", "",
             f"mode: {results['mode']}; total {results['elapsed_s']} s; "
             f"`bash tools/gpu/verify_all.sh{' --cpu-dry-run' if results['mode'] != 'gpu' else ''}`", ""]
    if results["mode"] != "gpu":
        lines += ["**Dry run on a CPU: tiny shapes, no GPU figure. Not a measurement.**", ""]
    for name, section in results["sections"].items():
        lines += [f"## {name}", "", f"{section['elapsed_s']} s of {section['allowed_s']} s allowed, {section['status']}",
                  ""] + table_lines(name, section, markdown=True) + [""]
    lines += ["## Reference figures (H100, llava-1b at 8 x 2048, tokens/s)", ""]
    lines += [f"- {figure}" for figure in vs.PEER_FIGURES]
    return "\n".join(lines) + "\n"


def problems(results: dict) -> list[str]:
    """What makes the run fail: failed checks, errored sections, and in the dry run any skip
    that is not one of the GPU-only ones."""
    found = []
    for name, section in results["sections"].items():
        if section["status"] == "error":
            found.append(f"section {name} failed: {section['log_tail'][-400:]}")
        for r in section["rows"]:
            if r.get("ok") is False:
                found.append(f"{name}: {r.get('check')} failed")
            if "error" in r:
                found.append(f"{name}: {r.get('label', r.get('op', '?'))} stage {r.get('stage', '-')}: {r['error']}")
            if results["mode"] != "gpu" and "skipped" in r and not r["skipped"].startswith(ALLOWED_DRY_SKIPS):
                found.append(f"{name}: unexpected skip in the dry run: {r}")
        if results["mode"] != "gpu" and section["status"] == "timed out":
            found.append(f"section {name} timed out in the dry run")
    return found


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def write_results(results: dict, out_dir: Path, copy_to: str | None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['date']}-{slug(results['device']) if results['mode'] == 'gpu' else 'cpu-dry-run'}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths[1].write_text(render_markdown(results))
    if copy_to:
        for path in paths:
            (Path(copy_to) / path.name).write_text(path.read_text())
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--with-compile", action="store_true", help="dry run: also HF + torch.compile "
                        "(inductor on a 2-core CPU: ~4 min for the HF model's stage 1 alone)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all sections (default: 450 on the GPU, the sum of the dry-run budgets on a CPU)")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the whole call started (the "
                        "shell wrapper's install time counts against the budget)")
    parser.add_argument("--only", default=None, help="comma-separated sections")
    parser.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--copy-to", default=os.environ.get("OUT"))
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--logits-shape", default="2x96", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_reference:
        batch, seq = (int(x) for x in args.logits_shape.split("x"))
        vs.cpu_reference(args.cpu_reference, batch, seq)
        return
    if args.section:
        child(args)
        return

    dry = args.cpu_dry_run
    budgets = dict(DRY_BUDGETS if dry else BUDGETS)
    for spec in args.budget:
        key, _, seconds = spec.partition("=")
        if key not in budgets:
            parser.error(f"--budget {spec}: unknown section {key!r} (one of {', '.join(budgets)})")
        budgets[key] = float(seconds)
    names = [n for n in budgets if args.only is None or n in args.only.split(",") or n == "env"]
    unknown = set((args.only or "").split(",")) - set(budgets) - {""}
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)} (one of {', '.join(budgets)})")
    started = args.started or time.time()
    total = args.budget_s if args.budget_s is not None else (sum(budgets[n] for n in names) if dry else 450.0)
    end = started + total
    print(f"verify_all: {'CPU dry run' if dry else 'GPU'}, {total:.0f} s for {', '.join(names)}; planned shares: "
          + ", ".join(f"{n} {s:.0f}s" for n, s in section_budgets(names, budgets, end - time.time()).items()),
          flush=True)
    sections = {}
    for i, name in enumerate(names):
        left = end - time.time()
        share = left * budgets[name] / sum(budgets[n] for n in names[i:])
        if share < 5:
            sections[name] = {"status": "skipped", "elapsed_s": 0, "allowed_s": round(share, 1),
                              "rows": [{"section": name, "skipped": "time budget"}], "log_tail": ""}
        else:
            sections[name] = run_section(name, dry, share, args.with_compile)
        if name == "throughput":
            vs.add_ratios(sections[name]["rows"])
        if dry:  # CPU figures judge no target
            for row in sections[name]["rows"]:
                row.pop("met", None)
        print(f"\n== {name} ({sections[name]['elapsed_s']} s of {sections[name]['allowed_s']:.0f} s, "
              f"{sections[name]['status']})", flush=True)
        print("\n".join(table_lines(name, sections[name], markdown=False)), flush=True)
    env = sections.get("env", {}).get("rows", [{}])
    env = env[0] if env else {}
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
               "device": env.get("device", "unknown"), "mode": "cpu-dry-run" if dry else "gpu",
               "elapsed_s": round(time.time() - started, 1), "budget_s": total, "sections": sections}
    out_dir = args.out_dir or (Path(__file__).resolve().parents[2] / ("outputs/verify-dry-run" if dry else "benchmarks/results"))
    paths = write_results(results, out_dir, None if dry else args.copy_to)
    print(f"\nresults: {', '.join(map(str, paths))}" + (f" (and copies in {args.copy_to})" if args.copy_to and not dry else ""))
    found = problems(results)
    if found:
        print("\nPROBLEMS:\n  " + "\n  ".join(found))
        sys.exit(1)
    print("all checks passed" + (" (dry run: no GPU figure)" if dry else ""))


if __name__ == "__main__":
    main()
