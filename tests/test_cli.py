"""The `megavlm` command: every subcommand's --help (with an example), not-yet-available tools named
as such, and the warning filter that keeps real warnings visible."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megavlm import cli
from tests.conftest import ROOT


def _megavlm(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megavlm", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_console_script_is_declared_and_installed():
    assert '"megavlm=megavlm.cli:main"' in (ROOT / "setup.py").read_text()
    script = Path(sys.executable).parent / "megavlm"
    assert script.is_file(), "pip install -e . installs the megavlm console script"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "commands:" in proc.stdout


def test_top_level_help_lists_every_command():
    proc = _megavlm("--help")
    assert proc.returncode == 0, proc.stderr
    for name in [*cli.COMMANDS, *cli.BENCHMARKS]:
        assert f"  {name} " in proc.stdout, name
    for name, cmd in cli.COMMANDS.items():  # a tool not in the checkout yet is marked, never faked
        line = next(l for l in proc.stdout.splitlines() if l.startswith(f"  {name} "))
        assert ("not available" in line) != cmd.available(), line


@pytest.mark.parametrize("args", [["train"], ["convert"], ["prepare-data"], ["bench", "throughput"],
                                  ["bench", "dataloader"], ["bench", "peft"], ["bench"]])
def test_subcommand_help_has_usage_and_an_example(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        code = cli.main([*args, "--help"])
    except SystemExit as done:  # argparse's own --help
        code = done.code
    assert code == 0
    out = capsys.readouterr().out
    assert "usage: megavlm " + args[0] in out
    assert "\nexample" in out and "megavlm " + " ".join(args) in out.split("\nexample")[-1]


@pytest.mark.parametrize("name", ["evaluate", "generate", "plan"])
def test_tools_being_built_elsewhere_appear_when_they_land(name, tmp_path, monkeypatch, capsys):
    cmd = cli.COMMANDS[name]
    monkeypatch.setattr(cli, "TOOLS", tmp_path)
    assert cli.main([name, "--ckpt", "x"]) == 2
    assert f"tools/{cmd.tool} does not exist yet" in capsys.readouterr().err
    (tmp_path / cmd.tool).write_text("import sys\nprint('ran with', sys.argv[1:])\n")
    assert cli.main([name, "--ckpt", "x"]) == 0
    assert "ran with ['--ckpt', 'x']" in capsys.readouterr().out


def test_unknown_command_is_an_error():
    proc = _megavlm("trian")
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_python_m_megavlm_train_still_works():
    proc = subprocess.run([sys.executable, "-m", "megavlm.train", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--resume" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "megavlm.train", str(ROOT / "no_such_recipe.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no_such_recipe.yaml" in proc.stderr


def test_known_dependency_warnings_are_filtered_and_real_ones_still_show():
    """megatron-core's TE/Apex fallback warnings go (one line names the fallbacks instead); a warning
    nobody listed, raised from megatron-core's own module, still reaches stderr."""
    code = ("from megavlm.console import setup_entry_point\nsetup_entry_point()\n"
            "import megatron.core.optimizer, warnings\n"
            "import megatron.core.optimizer as m\n"
            "exec(compile('import warnings; warnings.warn(\"a real problem\", UserWarning)', m.__file__, 'exec'), "
            "vars(m))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Transformer Engine and Apex are not installed" not in proc.stderr
    assert "a real problem" in proc.stderr
    assert proc.stdout.count("megavlm: ") == 1 and ("no Apex" in proc.stdout or "GPU" in proc.stdout)
