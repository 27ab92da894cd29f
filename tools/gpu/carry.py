#!/usr/bin/env python
"""Wheels for the GPU machine, moved in pieces small enough to carry one folder per device call.

The GPU machine reaches no package index and each call carries at most ~64 MiB, so the CPU side
packs the downloaded wheels into numbered folders and a manifest; the GPU side gathers the
folders of consecutive calls, joins them back into wheels, checks every sha256 and installs.

    pack     (CPU)  wheels in --src -> parts folders (each piece <= --part-mb, each folder <= --call-mb)
                    + <manifest dir>/manifest.json with sha256s and the ordered device calls
    stash    (GPU)  copy the parts folders present in the checkout into --parts (e.g. /tmp/parts)
    join     (GPU)  rebuild the wheels of the complete groups from --parts, checking sha256s
    install  (GPU)  pip --no-deps --target the joined wheels (TE's torch extension into its own
                    target, then merged), skipping packages the machine already has new enough

Only the standard library: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

MB = 1000 * 1000
MANIFEST = "manifest.json"
# pip arguments that install the GPU machine's cp312 manylinux wheels from any other Python (dry runs)
CP312_TARGET = ["--only-binary=:all:", "--python-version=3.12", "--implementation=cp"] + [
    f"--platform={tag}" for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
                                    "linux_x86_64")]


class CarryError(RuntimeError):
    """A missing, corrupt or unexpected piece: the message names the file."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_name(filename: str) -> str:
    """'pydantic_core-2.50.5-cp312-...whl' -> 'pydantic-core' (the distribution name)."""
    return filename.split("-")[0].replace("_", "-").lower()


def wheel_version(filename: str) -> str:
    return filename.split("-")[1]


# ---- CPU side: packing ------------------------------------------------------------------------
def plan_pieces(files: list[tuple[str, int]], part_bytes: int, call_bytes: int,
                min_piece: int = MB) -> list[list[tuple[str, int, int]]]:
    """Bins of (file, offset, length): each piece <= part_bytes, each bin <= call_bytes.

    Files are placed largest first; a file that fits whole in a bin's free room goes there,
    otherwise it is cut into pieces that fill the current bin and then open new ones, so the
    number of bins (device calls) stays near total / call_bytes."""
    if part_bytes > call_bytes:
        raise ValueError(f"part size {part_bytes} exceeds the per-call size {call_bytes}")
    bins: list[list[tuple[str, int, int]]] = []
    room: list[int] = []
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        whole = next((i for i, r in enumerate(room) if size <= min(r, part_bytes)), None)
        if whole is not None:
            bins[whole].append((name, 0, size))
            room[whole] -= size
            continue
        offset = 0
        while offset < size:
            left = size - offset
            if not room or room[-1] < min(left, min_piece):
                bins.append([])
                room.append(call_bytes)
            length = min(left, part_bytes, room[-1])
            bins[-1].append((name, offset, length))
            room[-1] -= length
            offset += length
    return bins


def pack(src: Path, groups: dict[str, list[str]], out_root: Path, manifest_dir: Path, part_bytes: int,
         call_bytes: int) -> dict:
    """Pack each group's wheels into its own run of folders (core first, optional groups after),
    write the manifest, return it."""
    for old in list(out_root.glob("parts*")):
        if old.is_dir():
            shutil.rmtree(old)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    wheels, folders, serial = [], [], 0
    for group, filenames in groups.items():
        sizes = {}
        for filename in filenames:
            path = src / filename
            if not path.is_file():
                raise CarryError(f"{path}: listed for group {group!r} but not downloaded")
            sizes[filename] = path.stat().st_size
        bins = plan_pieces(list(sizes.items()), part_bytes, call_bytes)
        pieces: dict[str, list[dict]] = {f: [] for f in filenames}
        for pieces_in_bin in bins:
            serial += 1
            folder = f"parts{serial}"
            (out_root / folder).mkdir(parents=True)
            for name, offset, length in pieces_in_bin:
                index = len(pieces[name])
                piece_name = f"{name}.part{index:02d}"
                with open(src / name, "rb") as f_in, open(out_root / folder / piece_name, "wb") as f_out:
                    f_in.seek(offset)
                    f_out.write(f_in.read(length))
                pieces[name].append({"folder": folder, "file": piece_name, "bytes": length,
                                     "sha256": sha256(out_root / folder / piece_name)})
            folders.append({"folder": folder, "group": group,
                            "bytes": sum(length for _, _, length in pieces_in_bin)})
        for filename in filenames:
            wheels.append({"file": filename, "group": group, "bytes": sizes[filename],
                           "sha256": sha256(src / filename), "pieces": pieces[filename]})
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "part_bytes": part_bytes,
                "call_bytes": call_bytes, "groups": list(groups), "wheels": wheels, "folders": folders,
                "calls": device_calls(folders, manifest_dir.name)}
    (manifest_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def device_calls(folders: list[dict], manifest_folder: str) -> list[dict]:
    """The ordered device calls: short stash calls carry the folders one by one; the last call
    carries the final core folder and the manifest and runs the checks. Folders of groups after
    'core' are optional and go before that last call (the checks skip a group not all there)."""
    core = [f for f in folders if f["group"] == "core"]
    order = core[:-1] + [f for f in folders if f["group"] != "core"] + core[-1:]
    calls = []
    for i, folder in enumerate(order):
        last = i == len(order) - 1
        calls.append({
            "call": i + 1, "carry": [manifest_folder, folder["folder"]] if last else [folder["folder"]],
            "group": folder["group"], "optional": folder["group"] != "core",
            "command": ("set -o pipefail; bash tools/gpu/verify_all.sh 2>&1 | tee $OUT/verify.log" if last
                        else "bash tools/gpu/verify_all.sh --stash-only"),
            "timeout_s": 560 if last else 90,
        })
    return calls


def describe_calls(manifest: dict) -> str:
    lines = [f"{len(manifest['calls'])} device calls, back to back (the machine stays warm only briefly "
             "between calls; a cold machine loses the stashed parts: start again from call 1):"]
    sizes = {f["folder"]: f["bytes"] for f in manifest["folders"]}
    for call in manifest["calls"]:
        carried = sum(sizes.get(c, 0) for c in call["carry"]) / 2**20
        flag = " (optional: skip to leave this group out)" if call["optional"] else ""
        lines.append(f"  {call['call']:>2}. carry {call['carry']} ({carried:.1f} MiB), timeout_s {call['timeout_s']}: "
                     f"{call['command']}{flag}")
    return "\n".join(lines)


# ---- GPU side: stash, join, install -----------------------------------------------------------
def stash(checkout: Path, parts_dir: Path) -> list[str]:
    """Copy every piece of the parts folders present in the checkout into parts_dir."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in sorted(p for p in checkout.glob("parts*") if p.is_dir()):
        for piece in sorted(folder.iterdir()):
            shutil.copyfile(piece, parts_dir / piece.name)
            copied.append(f"{folder.name}/{piece.name}")
    return copied


def missing_pieces(manifest: dict, parts_dir: Path) -> dict[str, list[str]]:
    """group -> pieces not (yet) in parts_dir."""
    missing: dict[str, list[str]] = {g: [] for g in manifest["groups"]}
    for wheel in manifest["wheels"]:
        for piece in wheel["pieces"]:
            if not (parts_dir / piece["file"]).is_file():
                missing[wheel["group"]].append(f"{piece['folder']}/{piece['file']}")
    return missing


def join(manifest: dict, parts_dir: Path, out_dir: Path, groups: list[str]) -> list[Path]:
    """Rebuild the wheels of ``groups`` from their pieces; every piece and wheel sha256-checked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    joined = []
    for wheel in (w for w in manifest["wheels"] if w["group"] in groups):
        target = out_dir / wheel["file"]
        with open(target, "wb") as f_out:
            for piece in wheel["pieces"]:
                path = parts_dir / piece["file"]
                if not path.is_file():
                    raise CarryError(f"{path}: piece of {wheel['file']} missing (carried in {piece['folder']})")
                if path.stat().st_size != piece["bytes"] or sha256(path) != piece["sha256"]:
                    raise CarryError(f"{path}: sha256/size differs from the manifest (from {piece['folder']}); "
                                     "re-run fetch_wheels.sh and carry the folders again")
                with open(path, "rb") as f_in:
                    shutil.copyfileobj(f_in, f_out, 1 << 22)
        if sha256(target) != wheel["sha256"]:
            raise CarryError(f"{target}: joined wheel's sha256 differs from the manifest")
        joined.append(target)
    return joined


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _version_tuple(version: str) -> tuple:
    parts = []
    for piece in version.replace("+", ".").split("."):
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def already_there(wheels: list[Path]) -> dict[str, str]:
    """Wheels whose package the machine already has at the same or a newer version."""
    kept = {}
    for wheel in wheels:
        have = _installed_version(wheel_name(wheel.name))
        if have is not None and _version_tuple(have) >= _version_tuple(wheel_version(wheel.name)):
            kept[wheel.name] = have
    return kept


def install(wheels: list[Path], target: Path, pip_args: list[str]) -> None:
    """pip --target, no index, no deps. Wheels whose files share a top-level folder with another
    (TE's torch extension beside TE's core) go in their own pip call, into a second target merged
    afterwards: one pip call per target replaces folders it finds there."""
    separate = [w for w in wheels if wheel_name(w.name) == "transformer-engine-torch"]
    rest = [w for w in wheels if w not in separate]
    for batch, dest in ((rest, target), (separate, target.with_name(target.name + "-te-torch"))):
        if not batch:
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(dest), *pip_args, *map(str, batch)]
        subprocess.run(cmd, check=True)
        if dest != target:
            shutil.copytree(dest, target, dirs_exist_ok=True)
            shutil.rmtree(dest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--src", type=Path, required=True, help="folder of downloaded wheels")
    p.add_argument("--group", action="append", required=True, metavar="NAME=FILE,FILE",
                   help="a group of wheels, in carry order; the first is the one the checks need")
    p.add_argument("--out", type=Path, default=Path("."), help="where the parts<N>/ folders go")
    p.add_argument("--manifest-dir", type=Path, default=Path("wheels"))
    p.add_argument("--part-mb", type=float, default=50)
    p.add_argument("--call-mb", type=float, default=60)
    s = sub.add_parser("stash")
    s.add_argument("--checkout", type=Path, default=Path("."))
    s.add_argument("--parts", type=Path, required=True)
    s.add_argument("--manifest", type=Path, default=None, help="report what is still missing")
    j = sub.add_parser("install")
    j.add_argument("--manifest", type=Path, required=True)
    j.add_argument("--parts", type=Path, required=True)
    j.add_argument("--joined", type=Path, required=True)
    j.add_argument("--target", type=Path, required=True)
    j.add_argument("--cp312", action="store_true", help="install for CPython 3.12 manylinux x86_64 from any "
                   "Python (a dry run of the GPU machine's install)")
    j.add_argument("--all", action="store_true", help="install every wheel, also those the machine has")
    args = parser.parse_args(argv)

    if args.cmd == "pack":
        groups = {}
        for spec in args.group:
            name, _, files = spec.partition("=")
            groups[name] = [f for f in files.split(",") if f]
        manifest = pack(args.src, groups, args.out, args.manifest_dir, int(args.part_mb * MB), int(args.call_mb * MB))
        print(describe_calls(manifest))
    elif args.cmd == "stash":
        copied = stash(args.checkout, args.parts)
        folders = sorted({c.split("/")[0] for c in copied}, key=lambda f: int(f[5:]) if f[5:].isdigit() else 0)
        print(f"stashed {len(copied)} pieces from {', '.join(folders) or 'no parts folder'} into {args.parts}")
        if args.manifest and args.manifest.is_file():
            for group, missing in missing_pieces(json.loads(args.manifest.read_text()), args.parts).items():
                print(f"  group {group}: {'complete' if not missing else f'{len(missing)} pieces still to carry'}")
    elif args.cmd == "install":
        manifest = json.loads(args.manifest.read_text())
        missing = missing_pieces(manifest, args.parts)
        if missing.get("core"):
            raise CarryError(f"core wheels incomplete in {args.parts}: missing {missing['core']}; carry those folders "
                             "first (see the manifest's calls)")
        complete = [g for g, m in missing.items() if not m]
        for group in (g for g, m in missing.items() if m):
            print(f"group {group}: {len(missing[group])} pieces not carried, not installed")
        wheels = join(manifest, args.parts, args.joined, complete)
        skip = {} if args.all else already_there(wheels)
        for name, have in skip.items():
            print(f"  {name}: the machine has {have}, kept")
        install([w for w in wheels if w.name not in skip], args.target, CP312_TARGET if args.cp312 else [])
        print(f"installed {len(wheels) - len(skip)} wheels into {args.target} (groups: {', '.join(complete)})")


if __name__ == "__main__":
    main()
