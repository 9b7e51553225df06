"""The Dockerfiles (no Docker engine here): pinned multi-stage builds that run as non-root, install with the
project's constraints, generate the protos, and start an entry command that exists in the package."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest

from memory3.services.cli.main import build_parser

from .charts import ROOT

DOCKERFILES = sorted(p for p in (ROOT / "deploy" / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_there_is_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_and_the_build_is_multi_stage(path):
    steps = instructions(path)
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    bases = [a.split()[0] for w, a in steps if w == "FROM"]
    assert len(bases) >= 2
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), image


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user(path):
    users = [a for w, a in instructions(path) if w == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    # The chart's securityContext runs the pods as the same user.
    values = (ROOT / "deploy" / "helm" / "memory3" / "values.yaml").read_text()
    assert f"runAsUser: {users[-1].split(':')[0]}" in values


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_with_the_constraints_and_generates_the_protos(path):
    steps = instructions(path)
    runs = " && ".join(a for w, a in steps if w == "RUN")
    assert "python protos/generate.py" in runs
    pins = constraints()
    for command in re.split(r"&&|;", runs):
        words = shlex.split(command)
        if words[:2] != ["pip", "install"]:
            continue
        if "-c" in words:
            assert words[words.index("-c") + 1] == "requirements/constraints.txt"
            continue
        # Outside the constraints file only exact pins that agree with it.
        packages = [w for w in words[2:] if not w.startswith("-") and not w.startswith("http")]
        for package in packages:
            name, _, version = package.partition("==")
            assert version and pins.get(name.lower()) == version, f"{path.name}: unpinned {package}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist(path):
    for word, args in instructions(path):
        if word == "COPY" and not args.startswith("--from"):
            *sources, _destination = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entry_command_exists_in_the_package(path):
    steps = instructions(path)
    entrypoint = json.loads(next(a for w, a in reversed(steps) if w == "ENTRYPOINT"))
    cmd = json.loads(next(a for w, a in reversed(steps) if w == "CMD"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["memory3"] and scripts["memory3"] == "memory3.services.cli.main:main"
    if cmd == ["--help"]:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args(cmd)
        assert done.value.code == 0
    else:
        args = build_parser().parse_args(cmd)
        assert (args.command, args.host) == ("serve", "0.0.0.0")


def runtime_packages(path) -> set[str]:
    """The Debian packages the last stage (the image itself) installs with apt-get."""
    steps = instructions(path)
    last = max(i for i, (w, _a) in enumerate(steps) if w == "FROM")
    packages = set()
    for word, args in steps[last:]:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages.update(w for w in words[2:] if not w.startswith("-"))
    return packages


def test_every_image_the_trainer_job_can_run_carries_the_training_corpora():
    """`memory3 train` always reads the Debian corpora (services/trainer/corpus.py); the chart's trainer Job
    runs in the image of trainer.job.imageFlavor (auto: cuda with a GPU, else cpu)."""
    from memory3.services.trainer.corpus import DEBIAN_PACKAGES

    schema = json.loads((ROOT / "deploy" / "helm" / "memory3" / "values.schema.json").read_text())
    flavors = set(schema["properties"]["trainer"]["properties"]["job"]["properties"]["imageFlavor"]["enum"])
    assert flavors == {"auto", "cpu", "cuda"}
    flavors -= {"auto"}
    makefile = (ROOT / "Makefile").read_text()
    for package in DEBIAN_PACKAGES.split():
        assert f"$$missing {package}\"" in makefile  # `make system-deps` installs the same
    for flavor in flavors:
        path = ROOT / "deploy" / "docker" / f"Dockerfile.{flavor}"
        assert set(DEBIAN_PACKAGES.split()) <= runtime_packages(path), path.name


def test_the_data_parallel_trainer_job_finds_torchrun_in_the_cuda_image():
    """With trainer.job.gpu.count above 1 the Job runs `torchrun ... --no-python memory3 train`: torch's
    console script, which pip puts in the CUDA image's virtual environment beside memory3, on its PATH."""
    from importlib.metadata import entry_points

    jobs = (ROOT / "deploy" / "helm" / "memory3" / "templates" / "trainer" / "_jobs.tpl").read_text()
    assert 'command: ["torchrun"]' in jobs
    assert [e.dist.name for e in entry_points(group="console_scripts") if e.name == "torchrun"] == ["torch"]
    steps = instructions(ROOT / "deploy" / "docker" / "Dockerfile.cuda")
    last = max(i for i, (w, _a) in enumerate(steps) if w == "FROM")
    built = [shlex.split(c) for w, a in steps[:last] if w == "RUN" for c in re.split(r"&&|;", a)]
    assert any(words[:2] == ["pip", "install"] and any(w.startswith("torch==") for w in words) for words in built)
    assert ("RUN", "python -m venv /opt/memory3") in steps[:last]
    assert ("COPY", "--from=build /opt/memory3 /opt/memory3") in steps[last:]
    assert any(w == "ENV" and "PATH=/opt/memory3/bin:$PATH" in a.split() for w, a in steps[last:])


def test_every_console_script_the_chart_uses_is_the_image_entrypoint():
    chart = ROOT / "deploy" / "helm" / "memory3" / "templates"
    commands = {m for f in chart.rglob("*.yaml") for m in re.findall(r'command: \[("[^"]+")', f.read_text())}
    assert commands == {'"memory3"', '"redis-server"', '"python"'}
