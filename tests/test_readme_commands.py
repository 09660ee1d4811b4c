"""Every command README.md documents, run exactly as written.

The commands are read from README.md's ```bash blocks, so a command added to
the README is run here too. `make test` is what runs this file, and the
`pip install` lines install into the user's own environment; those two are
the only ones left out. Each command must exit 0 within its time limit.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")

# Not run here: the test command itself, the sanitizer run and the CUDA build
# (CI runs both right after make test), and installs into another environment.
NOT_RUN = ("make test", "make sanitize", "make cuda-build", "pip install")
# Seconds per command; the full bench suite is the slowest.
TIMEOUT = 900


def readme_commands() -> list[str]:
    text = open(README).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            cmd = line.split("  #")[0].split(" # ")[0].strip()
            if cmd and not cmd.startswith("#") and not cmd.startswith(NOT_RUN):
                commands.append(cmd)
    return commands


COMMANDS = readme_commands()


def test_readme_lists_the_documented_commands():
    # The parse must find the commands the README is known to document; a
    # README that loses one fails here rather than silently running less.
    for expected in ("make bench", "make check", "make demo", "python -m rnnkern check",
                     "python -m rnnkern bench --quick",
                     "python -m rnnkern bench --quick --cell gru --json out.json --plot out.png"):
        assert expected in COMMANDS, (expected, COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, tmp_path):
    argv = shlex.split(command)
    if argv[0] == "make":
        # The Makefile's targets run .venv's python; from another environment
        # they would build a second venv, so they run where make test runs.
        if os.path.realpath(sys.executable) != os.path.realpath(VENV_PYTHON) and \
                os.path.abspath(sys.prefix) != os.path.join(ROOT, ".venv"):
            pytest.skip(f"{command!r} runs under the Makefile's .venv; this is {sys.executable}")
        cwd = ROOT
    else:
        # `python -m rnnkern ...` and `pytest ...` with this interpreter; files
        # a command writes (out.json, out.png) land in a scratch folder, and
        # pytest reads the repository's paths.
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "pytest":
            argv = [sys.executable, "-m", "pytest", *argv[1:]]
        cwd = ROOT if argv[-1].startswith("bench/") or "bench/" in argv else str(tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert r.returncode == 0, f"{command!r} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    if "out.json" in command:
        assert os.path.getsize(os.path.join(cwd, "out.json")) > 0
        assert os.path.getsize(os.path.join(cwd, "out.png")) > 0
    if command.endswith("rnnkern check") or command == "make check":
        assert re.search(r"^(\d+) passed, 0 failed$", r.stdout, flags=re.M), r.stdout[-2000:]


def test_readme_python_examples_run():
    """README.md's ```python examples, run in order in one namespace (a later
    example may use an earlier one's names, as a reader would run them)."""
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    assert len(blocks) >= 5, "README.md's Python examples were not found"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python example {i + 1}", "exec"), namespace)
