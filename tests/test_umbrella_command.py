"""The ``grad`` umbrella command and the one-line error for a missing optional dependency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")
from click.testing import CliRunner

from gradad.cli_utils import EXTRA_OF_MODULE
from gradad.commands import COMMANDS, load_command, main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_console_script_is_a_grad_subcommand_and_back() -> None:
    scripts = dict(PYPROJECT["project"]["scripts"])
    assert scripts.pop("grad") == "gradad.commands:main"
    assert {f"grad-{name}": f"{e.module}:{e.attribute}" for name, e in COMMANDS.items()} == scripts


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_subcommand_is_its_grad_script(name: str) -> None:
    own = CliRunner().invoke(load_command(name), ["--help"], prog_name=f"grad-{name}")
    via = CliRunner().invoke(main, [name, "--help"], prog_name="grad")
    assert own.exit_code == via.exit_code == 0
    assert via.output.replace(f"grad {name}", f"grad-{name}") == own.output


def test_the_umbrella_help_lists_every_command_without_importing_them() -> None:
    probe = ("import sys; from click.testing import CliRunner; from gradad.commands import main; "
             "out = CliRunner().invoke(main, ['--help']).output; print(out); "
             "print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[:2] in "
             "[['gradad', p] for p in ('training', 'export', 'runtime', 'refine', 'benchmarks', 'evaluation')] "
             "or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert all(f"  {name} " in out for name in COMMANDS)
    assert "IMPORTED []" in out


def test_a_command_without_its_optional_dependency_names_the_extra_to_install(tmp_path: Path) -> None:
    probe = ("import sys\n"
             "for name in ('torch', 'torchvision', 'timm'): sys.modules[name] = None  # a lean runtime install\n"
             "from gradad.commands import main\n"
             f"sys.argv = ['grad', 'train', '--data', {str(ROOT / 'tests')!r}, '-o', {str(tmp_path / 'run')!r}]\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "needs the Python package 'torch'" in done.stderr and "gradad[train]" in done.stderr


def test_every_named_extra_installs_its_package() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    distribution = {"paho": "paho-mqtt"}  # import name -> distribution name where they differ
    for module, extra in EXTRA_OF_MODULE.items():
        wanted = distribution.get(module, module)
        assert any(req.split("==")[0] == wanted for req in extras[extra]), (module, extra)


def test_only_a_missing_optional_package_itself_gets_the_install_line() -> None:
    from gradad.cli_utils import missing_extra_line

    assert "gradad[train]" in missing_extra_line(ModuleNotFoundError("No module named 'torch'", name="torch"))
    # a missing submodule of an installed package is a version or code bug: its traceback stays
    assert missing_extra_line(ModuleNotFoundError("x", name="torchvision.tranforms")) is None
    assert missing_extra_line(ModuleNotFoundError("x", name="gradad.trainning")) is None


def test_a_subcommand_module_that_needs_a_missing_package_when_loaded_names_the_extra(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    from gradad import commands

    (tmp_path / "needs_plots.py").write_text("import matplotlib\nmain = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(commands.COMMANDS, "plots", commands.CommandEntry("needs_plots", "main", "Plots."))
    result = CliRunner().invoke(main, ["plots"])
    assert result.exit_code == 2
    assert "needs the Python package 'matplotlib'" in result.output and "gradad[bench]" in result.output
