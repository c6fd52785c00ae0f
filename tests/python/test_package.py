"""The installed package: import, console script, and the CLI through Python."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import ccat_workflow_manager
from ccat_workflow_manager import _core


def test_version_matches_the_distribution():
    from importlib.metadata import version

    assert ccat_workflow_manager.__version__ == version("ccat-workflow-manager")


def test_console_script_runs_the_rust_cli(tmp_path):
    # The script sits beside the interpreter of the environment the package is installed in.
    exe = shutil.which("ccat-wfm", path=str(Path(sys.executable).parent))
    assert exe, "the ccat-wfm console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "Usage: ccat-wfm" in out.stdout
    db = tmp_path / "ops.sqlite"
    env = {"PATH": "/usr/bin:/bin", "CCAT_OPS_DB_DATABASE_SQLITE_DATABASE": str(db)}
    subprocess.run([exe, "db", "migrate"], env=env, check=True, cwd=tmp_path)
    check = subprocess.run([exe, "db", "check"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "every table and column" in check.stdout


def test_cli_main_returns_exit_codes():
    assert _core.cli_main(["ccat-wfm", "--version"]) == 0
    assert _core.cli_main(["ccat-wfm", "no-such-command"]) == 2


def test_extension_is_abi3():
    assert _core.__file__.endswith(".abi3.so"), _core.__file__


def test_module_runs_as_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "ccat_workflow_manager.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and ccat_workflow_manager.__version__ in out.stdout


def test_the_installed_console_script_runs_the_demo(tmp_path):
    # Local jobs started from the installed script run through this interpreter's
    # `ccat_workflow_manager.cli job-wrapper`, not through the interpreter itself.
    exe = shutil.which("ccat-wfm", path=str(Path(sys.executable).parent))
    out = subprocess.run(
        [exe, "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "data products of demo-maps (24)" in out.stdout
    assert "lineage of the map" in out.stdout
