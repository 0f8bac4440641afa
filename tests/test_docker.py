"""The container images and the compose file, checked without a Docker engine.

No Docker engine runs where the tests run, so the Dockerfiles are parsed (``tests/dockerfile.py``,
a small parser that follows Docker's rules for parser directives, continuation lines, comment
lines inside them and exec-form arguments) and checked for what a reviewer would check: pinned base images,
a non-root user before the entry point, a health check on the right endpoint, every copied
source and every script the image runs present in the project, the right exposed ports, no
secrets. ``docker/compose.yaml`` is read with PyYAML.

What can run here does run for real: the server entry point builds the tiny deployment, refuses
a missing checkpoint, serves a repository with a real tritonserver (started and stopped through
the entry point), and the health-check script is run with the exact arguments the images give it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest
import yaml
from dockerfile import (
    Instruction,
    global_args,
    image_env,
    key_values,
    parse_dockerfile,
    shell_commands,
    stages,
    substitute,
)
from triton_harness import LINEAR, make_linear_onnx, require_tritonserver

from acestep_triton.export.repository import render_repository
from acestep_triton.serving.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
GPU, FRONTEND, CPU_DEMO = "server.gpu.Dockerfile", "frontend.Dockerfile", "cpu-demo.Dockerfile"
DOCKERFILES = (GPU, FRONTEND, CPU_DEMO)
SERVER_PORTS = {8000, 8001, 8002}
FRONTEND_PORT = 7865
EXPECTED_PORTS = {GPU: SERVER_PORTS, CPU_DEMO: SERVER_PORTS, FRONTEND: {FRONTEND_PORT}}
EXPECTED_HEALTH = {GPU: ("/v2/health/ready", 8000), CPU_DEMO: ("/v2/health/ready", 8000),
                   FRONTEND: ("/", FRONTEND_PORT)}
SECRET_WORDS = {"TOKEN", "PASSWORD", "PASSWD", "SECRET", "KEY", "APIKEY", "CREDENTIAL", "CREDENTIALS"}
SECRET_VALUES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9]{20,})\b")
BASE_IMAGE_TOOLS = {"python", "python3", "sleep", "bash", "sh"}
"""Commands an image may run that come from its base image rather than from the project."""


# ------------------------------------------------------------------------------- loading
def docker_script(name: str) -> ModuleType:
    """``docker/<name>.py`` as a module: the images run these files as scripts (``docker/`` is
    no package), the tests call their functions."""
    spec = importlib.util.spec_from_file_location(f"acestep_docker_{name}", DOCKER / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> list[Instruction]:
    return parse_dockerfile((DOCKER / name).read_text())


def final_stage(name: str) -> list[Instruction]:
    return stages(load(name))[-1]


# ------------------------------------------------------------------------------- the checks
def base_image_problems(instructions: list[Instruction]) -> list[str]:
    """Every FROM names a pinned image: a digest, or an explicit version tag (never ``latest``)."""
    problems, names = [], set()
    env = global_args(instructions)
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = substitute(ins.value, env).split()
        image = words[0]
        if len(words) >= 3 and words[1].lower() == "as":
            names.add(words[2])
        if image in names or image == "scratch":
            continue
        if re.search(r"@sha256:[0-9a-f]{64}$", image):
            continue
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else None
        if tag is None or tag == "latest" or not re.search(r"\d", tag):
            problems.append(f"line {ins.line}: FROM {image} is not pinned to a version tag or digest")
    return problems


def _is_root(user: str) -> bool:
    name = user.split(":")[0].strip()
    return name in {"root", "0", ""}


def user_problems(stage: list[Instruction]) -> list[str]:
    """The image runs as a non-root USER, set before its ENTRYPOINT/CMD and never reset to root."""
    users = [ins for ins in stage if ins.keyword == "USER"]
    starts = [ins for ins in stage if ins.keyword in {"ENTRYPOINT", "CMD"}]
    if not users:
        return ["no USER: the container would run as root"]
    problems = []
    if _is_root(users[-1].value):
        problems.append(f"line {users[-1].line}: the last USER is root ({users[-1].value})")
    if starts and users[-1].line > min(s.line for s in starts):
        problems.append("USER comes after ENTRYPOINT/CMD")
    return problems


def secret_problems(instructions: list[Instruction]) -> list[str]:
    """No ENV/ARG that looks like a credential carries a value, and no value looks like a token."""
    problems = []
    for ins in instructions:
        if ins.keyword not in {"ENV", "ARG", "LABEL"}:
            continue
        for name, value in key_values(ins).items():
            words = set(re.split(r"[_\-.]", name.upper()))
            if ins.keyword != "LABEL" and words & SECRET_WORDS and value:
                problems.append(f"line {ins.line}: {ins.keyword} {name} bakes a credential into the image")
            if SECRET_VALUES.search(value):
                problems.append(f"line {ins.line}: {ins.keyword} {name} holds something token-shaped")
    for ins in instructions:
        if SECRET_VALUES.search(ins.value):
            problems.append(f"line {ins.line}: a token-shaped string in {ins.keyword}")
    return sorted(set(problems))


def _copies(stage: list[Instruction]) -> list[tuple[list[str], str, Instruction]]:
    """(sources, absolute destination, instruction) of every COPY/ADD from the build context."""
    workdir, result = PurePosixPath("/"), []
    for ins in stage:
        if ins.keyword == "WORKDIR":
            workdir = workdir / ins.value
        elif ins.keyword in {"COPY", "ADD"} and ins.flag("from") is None:
            words = ins.words()
            sources, dest = words[:-1], words[-1]
            absolute = str(workdir / dest) + ("/" if dest.endswith("/") else "")
            result.append((sources, absolute, ins))
    return result


def copy_problems(stage: list[Instruction], root: Path = ROOT) -> list[str]:
    problems = []
    for sources, _, ins in _copies(stage):
        for source in sources:
            if re.match(r"^[a-z]+://", source):
                problems.append(f"line {ins.line}: {ins.keyword} from a URL ({source}) is not reproducible")
            elif not list(root.glob(source.rstrip("/"))):
                problems.append(f"line {ins.line}: {ins.keyword} source {source} does not exist in the project")
    return problems


def project_file(image_path: str, stage: list[Instruction], root: Path = ROOT) -> Path | None:
    """The project file that ends up at ``image_path`` in the image, if a COPY puts one there."""
    for sources, dest, _ in _copies(stage):
        for source in sources:
            local = root / source.rstrip("/")
            if local.is_dir():
                prefix = dest.rstrip("/") + "/"
                if image_path.startswith(prefix):
                    return local / image_path[len(prefix):]
            else:
                into_dir = dest.endswith("/") or len(sources) > 1
                target = dest + local.name if into_dir else dest
                if image_path == target.replace("//", "/"):
                    return local
    return None


def script_modes(script: Path) -> set[str]:
    """The first-argument modes a ``case "$command"`` entry script handles (``run) ...``)."""
    modes: set[str] = set()
    for match in re.finditer(r"^\s*([a-z][a-z|-]*)\)", script.read_text(), re.MULTILINE):
        modes.update(match.group(1).split("|"))
    return modes


def command_problems(stage: list[Instruction], root: Path = ROOT) -> list[str]:
    """ENTRYPOINT/CMD in exec form (so PID 1 gets SIGTERM), naming project scripts that exist
    and are executable; a CMD under an entry-point script names one of the script's modes;
    every project path that RUN or HEALTHCHECK uses exists."""
    problems: list[str] = []
    entry = [ins for ins in stage if ins.keyword == "ENTRYPOINT"]
    cmd = [ins for ins in stage if ins.keyword == "CMD"]
    if not entry:
        problems.append("no ENTRYPOINT")
        return problems
    argv = entry[-1].exec_form()
    if argv is None:
        return [f"line {entry[-1].line}: ENTRYPOINT must use the exec form (signals reach PID 1)"]
    script = project_file(argv[0], stage, root)
    if script is None:
        problems.append(f"ENTRYPOINT {argv[0]} is not a file the image copies from the project")
    elif not script.is_file():
        problems.append(f"ENTRYPOINT {argv[0]} comes from {script}, which does not exist")
    elif not os.access(script, os.X_OK):
        problems.append(f"{script} is not executable")
    if cmd:
        args = cmd[-1].exec_form()
        if args is None:
            problems.append(f"line {cmd[-1].line}: CMD must use the exec form")
        elif script is not None and script.is_file() and args and args[0] not in script_modes(script):
            problems.append(f"CMD {args[0]!r} is not a mode of {script.name} ({sorted(script_modes(script))})")
    for ins in stage:
        if ins.keyword in {"RUN", "HEALTHCHECK"}:
            for word in re.findall(r"/opt/acestep/\S+?(?=[\s\"',]|$)", ins.value):
                local = project_file(word, stage, root)
                if local is None or not local.exists():
                    problems.append(f"line {ins.line}: {word} is not in the project ({local})")
            for word in re.findall(r"(?<![\w/])docker/[\w.-]+\.(?:py|sh)\b", ins.value):
                if not (root / word).is_file():
                    problems.append(f"line {ins.line}: {word} is not in the project")
    return problems


def healthcheck(stage: list[Instruction]) -> Instruction | None:
    checks = [ins for ins in stage if ins.keyword == "HEALTHCHECK"]
    return checks[-1] if checks else None


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def healthcheck_problems(stage: list[Instruction], path: str, port: int, root: Path = ROOT) -> list[str]:
    """A HEALTHCHECK (exec form) runs our healthcheck.py on ``path``, on the port variable the
    image sets (whose default is ``port``), and has a start period for model loading."""
    hc = healthcheck(stage)
    if hc is None or hc.value.upper() == "NONE":
        return ["no HEALTHCHECK"]
    if not hc.value.startswith("CMD"):
        return [f"line {hc.line}: HEALTHCHECK needs CMD"]
    args = Instruction("CMD", hc.value[3:].strip(), hc.line).exec_form()
    if args is None:
        return [f"line {hc.line}: HEALTHCHECK CMD must use the exec form"]
    problems = []
    if hc.flag("start-period") is None:
        problems.append("HEALTHCHECK without --start-period (model loading would count as failures)")
    script = next((a for a in args if a.endswith("healthcheck.py")), None)
    local = project_file(script, stage, root) if script else None
    if local is None or not local.is_file():
        problems.append(f"HEALTHCHECK does not run the project's healthcheck.py ({args})")
    if _option(args, "--path") != path:
        problems.append(f"HEALTHCHECK probes {_option(args, '--path')}, expected {path}")
    if _option(args, "--default-port") != str(port):
        problems.append(f"HEALTHCHECK default port {_option(args, '--default-port')}, expected {port}")
    port_env = _option(args, "--port-env")
    if port_env is None or image_env(stage).get(port_env) != str(port):
        problems.append(f"HEALTHCHECK reads the port from {port_env}, which the image does not set to {port}")
    return problems


def exposed(stage: list[Instruction]) -> set[int]:
    return {int(word.split("/")[0]) for ins in stage if ins.keyword == "EXPOSE" for word in ins.value.split()}


def pip_installs(stage: list[Instruction]) -> list[list[str]]:
    """The argument lists of every ``pip install`` in the stage's RUN instructions."""
    installs = []
    for ins in stage:
        if ins.keyword == "RUN":
            for words in shell_commands(ins.value):
                for k in range(len(words) - 1):
                    if words[k] == "pip" and words[k + 1] == "install":
                        installs.append(words[k + 2:])
    return installs


def installs_root_project(args: list[str]) -> bool:
    return any(a == "." or a.startswith(".[") or a == "./" for a in args)


# ------------------------------------------------------------------------------- parser tests
def test_parser_follows_dockerfile_rules() -> None:
    text = "\n".join([
        "# syntax=docker/dockerfile:1",
        "# escape=\\",
        "ARG TAG=3.12.1-slim",
        "FROM python:${TAG} AS base",
        "# a comment",
        "run apt-get update \\",
        "# a comment inside the continued instruction is dropped",
        "    && echo done",
        "COPY --chmod=0755 --link a.sh b.sh /opt/x/",
        'CMD ["serve", \\',
        '     "--port", "8000"]',
    ])
    instructions = parse_dockerfile(text)
    assert [i.keyword for i in instructions] == ["ARG", "FROM", "RUN", "COPY", "CMD"]
    run = instructions[2]
    assert run.value == "apt-get update && echo done" and run.line == 6
    copy_ins = instructions[3]
    assert copy_ins.flags == (("chmod", "0755"), ("link", "")) and copy_ins.words() == ["a.sh", "b.sh", "/opt/x/"]
    assert instructions[4].exec_form() == ["serve", "--port", "8000"]
    assert substitute(instructions[1].value, global_args(instructions)) == "python:3.12.1-slim AS base"
    assert substitute("${MISSING:-fallback} $TAG", {"TAG": "t"}) == "fallback t"
    backtick = parse_dockerfile("# escape=`\nFROM x:1\nRUN a `\n  b\n")
    assert backtick[1].value == "a b"
    with pytest.raises(ValueError, match="heredocs"):
        parse_dockerfile("FROM x:1\nRUN <<EOF\necho hi\nEOF\n")


def test_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """Each check, given a Dockerfile with its defect, names it (so a clean result means something)."""
    bad = parse_dockerfile("\n".join([
        "FROM python:latest",
        "FROM ubuntu",
        "ARG HF_TOKEN=abc",
        "ENV API_KEY=xyz MODE=fast",
        "WORKDIR /opt/acestep",
        "COPY missing_dir/ missing_dir/",
        "COPY --chmod=0755 run.sh docker/",
        'ENTRYPOINT ["/opt/acestep/docker/run.sh"]',
        'CMD ["fly"]',
        "USER 1000",
        "EXPOSE 8000",
    ]))
    (tmp_path / "run.sh").write_text("case $1 in\n  run) ;;\nesac\n")  # not executable
    stage = stages(bad)[-1]
    assert len(base_image_problems(bad)) == 2
    assert any("USER comes after" in p for p in user_problems(stage))
    assert user_problems(stages(parse_dockerfile("FROM a:1\nUSER root\nCMD [\"x\"]"))[-1])
    assert {p.split()[3] for p in secret_problems(bad) if "credential" in p} == {"HF_TOKEN", "API_KEY"}
    assert any("missing_dir" in p for p in copy_problems(stage, tmp_path))
    problems = command_problems(stage, tmp_path)
    assert any("not executable" in p for p in problems) and any("'fly'" in p for p in problems)
    assert healthcheck_problems(stage, "/v2/health/ready", 8000, tmp_path) == ["no HEALTHCHECK"]
    shell_form = stages(parse_dockerfile("FROM a:1\nENTRYPOINT /bin/run\n"))[-1]
    assert "exec form" in command_problems(shell_form, tmp_path)[0]


# ------------------------------------------------------------------------------- the images
@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name: str) -> None:
    assert base_image_problems(load(name)) == []


def test_gpu_base_is_an_ngc_tritonserver_with_python_312() -> None:
    """NGC tritonserver 24.12+ is Ubuntu 24.04 / Python 3.12 (we pin 25.01 or later), -py3 flavour
    (with the python and tensorrt backends), as the single stage."""
    froms = [i for i in load(GPU) if i.keyword == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", froms[0].value)
    assert match, froms[0].value
    assert (int(match.group(1)), int(match.group(2))) >= (25, 1), froms[0].value


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root(name: str) -> None:
    assert user_problems(final_stage(name)) == []


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_probes_the_right_endpoint(name: str) -> None:
    path, port = EXPECTED_HEALTH[name]
    assert healthcheck_problems(final_stage(name), path, port) == []


@pytest.mark.parametrize("name", DOCKERFILES)
def test_server_healthchecks_also_check_the_model_processes(name: str) -> None:
    """Triton's /v2/health/ready stays 200 after a model's backend process died, so the server
    images also run the components check; the front end has no server to check."""
    hc = healthcheck(final_stage(name))
    assert hc is not None
    args = Instruction("CMD", hc.value[3:].strip(), hc.line).exec_form() or []
    assert _option(args, "--components") == (None if name == FRONTEND else "ready"), args


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist(name: str) -> None:
    assert copy_problems(final_stage(name)) == []


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_and_scripts_exist(name: str) -> None:
    assert command_problems(final_stage(name)) == []


@pytest.mark.parametrize("name", DOCKERFILES)
def test_exposed_ports(name: str) -> None:
    assert exposed(final_stage(name)) == EXPECTED_PORTS[name]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_secrets_baked_in(name: str) -> None:
    assert secret_problems(load(name)) == []


@pytest.mark.parametrize("name", [GPU, CPU_DEMO])
def test_server_images_install_the_project_editable_with_its_repository_sources(name: str) -> None:
    """The renderer reads model_repository/ and ensemble_configs/ beside pyproject.toml (the
    project root), so the server images install the project editable where those are copied."""
    stage = final_stage(name)
    workdir = [i.value for i in stage if i.keyword == "WORKDIR"][-1]
    copied = {dest for _, dest, _ in _copies(stage)}
    for folder in ("src", "model_repository", "ensemble_configs"):
        assert f"{workdir}/{folder}/" in copied, (folder, copied)
    assert any("-e" in args and any(a.startswith(".[") for a in args) for args in pip_installs(stage))
    numpy_pin = "numpy==1.26.4"
    assert numpy_pin in (ROOT / "pyproject.toml").read_text(), "the Python-backend stub needs numpy 1"


def test_gpu_image_leaves_out_pytriton_and_guards_numpy_and_tensorrt() -> None:
    stage = final_stage(GPU)
    installs = pip_installs(stage)
    flat = " ".join(" ".join(a) for a in installs)
    assert "nvidia-pytriton" not in flat and "serve" not in re.findall(r"\.\[([^\]]*)\]", flat)[0].split(",")
    assert "export" in re.findall(r"\.\[([^\]]*)\]", flat)[0].split(",")
    runs = " ".join(i.value for i in stage if i.keyword == "RUN")
    assert "numpy.__version__" in runs and "startswith('1.')" in runs, "build must fail on numpy 2"
    # The TensorRT builder is chosen from the image's own TensorRT, then checked against it.
    assert ["$(python3 docker/check_tensorrt.py --pip-requirement)"] in installs  # one quoted word
    install = next(i.value for i in stage if i.keyword == "RUN" and "--pip-requirement" in i.value)
    assert install.rstrip().endswith("&& python3 docker/check_tensorrt.py"), "the check must come after it"


def _volumes(stage: list[Instruction]) -> set[str]:
    """Paths of the stage's VOLUME instructions (JSON or plain form)."""
    paths: set[str] = set()
    for ins in stage:
        if ins.keyword == "VOLUME":
            paths.update(ins.exec_form() or ins.value.split())
    return paths


def test_gpu_image_keeps_the_compile_cache_on_a_volume_the_user_can_write() -> None:
    """TorchInductor's and Triton's kernel caches point into a VOLUME (a restarted container loads
    the compiled DiT kernels instead of compiling them again before it is ready), created and
    owned by the image's non-root user before USER switches to it."""
    stage = final_stage(GPU)
    env = image_env(stage)
    volumes = _volumes(stage)
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        path = PurePosixPath(env[variable])
        assert any(path.is_relative_to(v) for v in volumes), f"{variable}={path} is not on a volume {volumes}"
        assert not any(path.is_relative_to(p) for p in ("/tmp", "/models/repository")), path
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    runs = [i for i in stage if i.keyword == "RUN" and "chown" in i.value]
    user_line = next(i.line for i in stage if i.keyword == "USER")
    cache_root = str(PurePosixPath(env["TORCHINDUCTOR_CACHE_DIR"]).parent)
    assert any(cache_root in r.value and "1000:1000" in r.value and r.line < user_line for r in runs), \
        "the cache folders must exist and belong to uid 1000 before USER"


def test_compose_gpu_server_mounts_a_named_compile_cache_volume(compose: dict) -> None:
    env = image_env(final_stage(GPU))
    cache_root = str(PurePosixPath(env["TORCHINDUCTOR_CACHE_DIR"]).parent)
    volumes = compose["services"]["server"]["volumes"]
    named = [v.split(":")[0] for v in volumes if v.split(":")[1] == cache_root]
    assert named and named[0] in compose["volumes"], (volumes, cache_root)
    assert all(not any(str(v).endswith(":" + cache_root) for v in s.get("volumes", []))
               for n, s in compose["services"].items() if n != "server")


def test_frontend_image_has_no_torch() -> None:
    """Only the client, the ui extra and the acestep_triton package without its dependencies."""
    stage = final_stage(FRONTEND)
    installs = pip_installs(stage)
    assert installs
    for args in installs:
        assert not any("torch" in a for a in args), args
        if installs_root_project(args):
            assert "--no-deps" in args, f"the root project's dependencies include torch: {args}"
    runs = " ".join(i.value for i in stage if i.keyword == "RUN")
    assert "find_spec('torch')" in runs, "the build must fail if torch slips in"
    assert "extra_requirements.py pyproject.toml ui" in runs


def test_frontend_distribution_provides_what_the_image_runs() -> None:
    """The image installs the `ui` extra and runs the `acestep-frontend` console script; both
    must be declared in pyproject.toml (the extra without torch)."""
    extra_requirements = docker_script("extra_requirements").extra_requirements
    import tomllib  # Python 3.11+ (the project supports 3.10): only this test needs it

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "acestep-frontend" in project.get("scripts", {}), "pyproject.toml declares no acestep-frontend script"
    assert "acestep-frontend" in (DOCKER / "entrypoint-frontend.sh").read_text()
    ui = extra_requirements(ROOT / "pyproject.toml", "ui")
    assert any(r.lower().startswith("gradio") for r in ui), ui
    assert not any(r.lower().startswith(("torch", "transformers", "diffusers")) for r in ui), ui


def test_extra_requirements_script(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n[project.optional-dependencies]\nui = ["gradio==5.0.0", "a>=1"]\n')
    script = DOCKER / "extra_requirements.py"
    out = subprocess.run([sys.executable, str(script), str(pyproject), "ui"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["gradio==5.0.0", "a>=1"]
    missing = subprocess.run([sys.executable, str(script), str(pyproject), "gpu"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no extra 'gpu'" in missing.stderr and "ui" in missing.stderr


def test_cpu_demo_builds_the_tiny_deployment_at_build_time_as_the_user() -> None:
    """The stub is installed as root (site-packages), the tiny deployment is built as the
    non-root user after the environment that selects the tiny checkpoint and the cpu target."""
    stage = final_stage(CPU_DEMO)
    runs = [i for i in stage if i.keyword == "RUN"]
    prepare = next(i for i in runs if "acestep_triton.serving.server prepare" in i.value)
    build = next(i for i in runs if i.value.endswith("entrypoint-server.sh build"))
    user = next(i for i in stage if i.keyword == "USER")
    assert prepare.line < user.line < build.line
    env = image_env([i for i in stage if i.line < build.line])
    assert env.get("ACESTEP_TINY_CHECKPOINT") == "1" and env.get("ACESTEP_TARGET") == "cpu"
    assert any("serve" in re.findall(r"\.\[([^\]]*)\]", " ".join(a))[0].split(",")
               for a in pip_installs(stage) if "-e" in a)


def test_check_tensorrt_compares_the_builder_with_the_backend(tmp_path: Path) -> None:
    ct = docker_script("check_tensorrt")
    for name in ("libnvinfer.so.10", "libnvinfer.so.10.8.0", "libnvinfer.so.10.7.0", "libnvinfer_plugin.so.10.9.0"):
        (tmp_path / name).touch()
    assert ct.system_tensorrt_version([tmp_path, tmp_path / "absent"]) == (10, 8, 0)
    assert ct.system_tensorrt_version([tmp_path / "absent"]) is None
    assert ct.mismatch((10, 8, 0), "10.8.0.43") is None
    assert "10.8.0" in str(ct.mismatch((10, 8, 0), "10.9.0.34"))
    assert "not installed" in str(ct.mismatch((10, 8, 0), None))
    assert ct.mismatch(None, "11.0.0.1") is None

    assert ct.cuda_major({"CUDA_VERSION": "12.8.0.038"}, []) == 12
    for name in ("libcudart.so.12", "libcudart.so.13.0.48", "libcudart.so"):
        (tmp_path / name).touch()
    assert ct.cuda_major({}, [tmp_path]) == 13 and ct.cuda_major({}, [tmp_path / "absent"]) is None
    assert ct.pip_requirement((10, 8, 0), 12) == "tensorrt-cu12==10.8.0.*"
    with pytest.raises(ValueError, match="libnvinfer"):
        ct.pip_requirement(None, 12)
    with pytest.raises(ValueError, match="CUDA major"):
        ct.pip_requirement((10, 8, 0), None)


# ------------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def _gib(size: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).lower())
    assert match, size
    return float(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)] / 2**30


def test_compose_profiles_are_self_contained(compose: dict) -> None:
    services = compose["services"]
    profiles = {name: set(s.get("profiles", [])) for name, s in services.items()}
    assert profiles == {"server": {"gpu"}, "frontend": {"gpu"}, "server-cpu": {"cpu"}, "frontend-cpu": {"cpu"}}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert profiles[dependency] >= profiles[name], f"{name} depends on {dependency} outside its profile"


def test_compose_ports_healthchecks_and_images(compose: dict) -> None:
    for name, service in compose["services"].items():
        frontend = name.startswith("frontend")
        assert _container_ports(service) == ({FRONTEND_PORT} if frontend else SERVER_PORTS), name
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and any(t.endswith("healthcheck.py") for t in test), name
        assert _option(test, "--path") == ("/" if frontend else "/v2/health/ready"), name
        assert _option(test, "--components") == (None if frontend else "ready"), name
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), image
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), build
    servers = {n: s for n, s in compose["services"].items() if not n.startswith("frontend")}
    for name, service in servers.items():
        assert _gib(service["shm_size"]) >= 1, f"{name}: the Python backend needs a large /dev/shm"
        assert service["healthcheck"].get("start_period"), name


def test_compose_gpu_reservation_only_on_the_gpu_server(compose: dict) -> None:
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name == "server":
            assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
        else:
            assert not devices, name


def test_compose_frontends_wait_for_a_healthy_server(compose: dict) -> None:
    services = compose["services"]
    for name in ("frontend", "frontend-cpu"):
        service = services[name]
        (server, condition), = service["depends_on"].items()
        assert condition == {"condition": "service_healthy"}
        assert service["environment"]["ACESTEP_URL"] == f"{server}:8001"
        assert server in services and not server.startswith("frontend")


def test_compose_checkpoint_mounted_read_only_and_no_secrets(compose: dict) -> None:
    volumes = compose["services"]["server"]["volumes"]
    checkpoint = [v for v in volumes if ":/models/checkpoint" in v]
    assert checkpoint and checkpoint[0].endswith(":ro")
    for name, service in compose["services"].items():
        assert "secrets" not in service and "env_file" not in service, name
        for key, value in service.get("environment", {}).items():
            words = set(re.split(r"[_\-.]", key.upper()))
            # a credential may only be passed through from the host's environment, never written here
            assert not (words & SECRET_WORDS) or value == f"${{{key}:-}}", f"{name}: {key}"
            assert not SECRET_VALUES.search(str(value)), f"{name}: {key}"


def test_compose_passes_the_optional_keys_from_the_host(compose: dict) -> None:
    """Issue 19: the keys are off unless the shell running compose sets them; the servers get the
    API and admin keys, the front ends the API key (to forward) and their own login."""
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        wanted = ({"ACESTEP_API_KEY", "ACESTEP_FRONTEND_AUTH"} if name.startswith("frontend")
                  else {"ACESTEP_API_KEY", "ACESTEP_ADMIN_KEY"})
        assert {k: env.get(k) for k in wanted} == {k: f"${{{k}:-}}" for k in wanted}, name


# ------------------------------------------------------------------------------- the scripts, for real
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _entrypoint(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(DOCKER / "entrypoint-server.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _image_healthcheck_argv(name: str) -> list[str]:
    """The HEALTHCHECK command of an image, with image paths replaced by the project's files."""
    stage = final_stage(name)
    hc = healthcheck(stage)
    assert hc is not None
    argv = Instruction("CMD", hc.value[3:].strip(), hc.line).exec_form() or []
    return [sys.executable if a in {"python", "python3"} else str(project_file(a, stage) or a) for a in argv]


@pytest.mark.parametrize("script", sorted(p.name for p in DOCKER.glob("*.sh")))
def test_shell_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(DOCKER / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_healthcheck_script_against_a_live_and_a_closed_port() -> None:
    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        argv = _image_healthcheck_argv(CPU_DEMO)
        port = str(server.server_address[1])
        live = subprocess.run(argv, env=_env(ACESTEP_HTTP_PORT=port), capture_output=True, text=True, timeout=30)
        assert live.returncode == 0, live.stderr
        wrong_path = list(argv)
        wrong_path[argv.index("--path") + 1] = "/nope"
        wrong = subprocess.run(wrong_path, env=_env(ACESTEP_HTTP_PORT=port), capture_output=True, text=True)
        assert wrong.returncode == 1 and "/nope" in wrong.stderr
        closed = subprocess.run(argv, env=_env(ACESTEP_HTTP_PORT=str(free_ports(1)[0])), capture_output=True,
                                text=True, timeout=30)
        assert closed.returncode == 1 and "unhealthy" in closed.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_entrypoint_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    result = _entrypoint("build", env=_env(ACESTEP_MODELS_DIR=str(tmp_path), ACESTEP_TARGET="cpu"), timeout=120)
    assert result.returncode == 1
    assert f"no complete checkpoint at {tmp_path}/checkpoint" in result.stderr
    assert "ACESTEP_TINY_CHECKPOINT=1" in result.stderr and "download" in result.stderr
    assert not (tmp_path / "repository").exists()


def test_frontend_entrypoint_serves_the_ui_the_healthcheck_probes(tmp_path: Path) -> None:
    """`entrypoint-frontend.sh` starts the real Gradio front end with the flags it passes (the
    server address, interface and port from the environment), the image's HEALTHCHECK command
    sees it healthy, and SIGTERM stops it. The server it points at is not running: the UI must
    come up anyway (it reports errors per request)."""
    pytest.importorskip("gradio", reason="the front end needs gradio (the ui extra)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if not (Path(sys.executable).parent / "acestep-frontend").exists():
        # the console script is declared by pyproject.toml (checked above); run the module meanwhile
        shim = bin_dir / "acestep-frontend"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m acestep_triton.frontend "$@"\n')
        shim.chmod(0o755)
    port, dead_server = free_ports(2)
    env = _env(ACESTEP_URL=f"127.0.0.1:{dead_server}", ACESTEP_FRONTEND_HOST="127.0.0.1",
               ACESTEP_FRONTEND_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", HOME=str(tmp_path),
               TMPDIR=str(tmp_path))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    log = (tmp_path / "frontend.log").open("w")
    process = subprocess.Popen(["bash", str(DOCKER / "entrypoint-frontend.sh")], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        argv = _image_healthcheck_argv(FRONTEND)
        deadline = time.monotonic() + 120
        while subprocess.run(argv, env=env, capture_output=True).returncode != 0:
            assert process.poll() is None, (tmp_path / "frontend.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "frontend.log").read_text()[-3000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.mark.slow
def test_entrypoint_builds_the_tiny_repository_then_reuses_it(tmp_path: Path, tiny_onnx_ckpt: Path,
                                                              tiny_onnx_dir: Path) -> None:
    """Build mode with the demo's tiny checkpoint writes checkpoint → ONNX → repository and a
    stamp; a second start reuses it; a stamp from another build target triggers a rebuild.
    The session's ONNX export of the same tiny checkpoint is put in the build's cache (same
    content, same key), so the export itself is not repeated here."""
    models = tmp_path / "models"
    (models / "onnx").mkdir(parents=True)
    (models / "onnx" / tiny_onnx_dir.name).symlink_to(tiny_onnx_dir, target_is_directory=True)
    env = _env(ACESTEP_MODELS_DIR=str(models), ACESTEP_TARGET="cpu", ACESTEP_TINY_CHECKPOINT="1")

    first = _entrypoint("build", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "writing the tiny random checkpoint" in first.stderr
    assert sorted(p.name for p in (models / "onnx").iterdir()) == [tiny_onnx_dir.name], \
        "the tiny checkpoint differs from the fixture's, so the export ran again"
    repository = models / "repository"
    served = {p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()}
    assert {"text2music", "dit_decoder", "vocoder"} <= served, served
    config = (repository / "text2music" / "config.pbtxt").read_text()
    assert str(models / "assets") in config, "the endpoints must name the assets under the models folder"
    assert (models / ".acestep-build").read_text().strip() == "target=cpu"

    mtime = repository.stat().st_mtime_ns
    second = _entrypoint("build", env=env)
    assert second.returncode == 0 and "not rebuilding" in second.stderr
    assert repository.stat().st_mtime_ns == mtime

    (models / ".acestep-build").write_text("target=gpu gpu=NVIDIA H100 tensorrt=10.8.0\n")
    third = _entrypoint("build", env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "rebuilding" in third.stderr and "writing the tiny" not in third.stderr
    assert (models / ".acestep-build").read_text().strip() == "target=cpu"


@pytest.mark.triton
def test_entrypoint_serves_until_sigterm_and_the_image_healthcheck_sees_it(tmp_path: Path) -> None:
    """`entrypoint-server.sh serve` runs a real tritonserver on the configured ports; the image's
    own HEALTHCHECK command turns healthy; the metrics port carries the two counters the HPA's
    adapter rule divides; SIGTERM to the entry point (what Docker and the kubelet send) stops
    it with status 0."""
    require_tritonserver()
    models = tmp_path / "models"
    make_linear_onnx(tmp_path / "onnx" / f"{LINEAR.name}.onnx", LINEAR)
    render_repository(models / "repository", "cpu", tmp_path / "onnx", [], components=[LINEAR], max_items=4,
                      intra_op_threads=1)
    http, grpc, metrics = free_ports(3)
    env = _env(ACESTEP_MODELS_DIR=str(models), ACESTEP_TARGET="cpu", ACESTEP_HTTP_PORT=str(http),
               ACESTEP_GRPC_PORT=str(grpc), ACESTEP_METRICS_PORT=str(metrics), ACESTEP_STARTUP_TIMEOUT_S="180")
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(["bash", str(DOCKER / "entrypoint-server.sh"), "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        argv = _image_healthcheck_argv(CPU_DEMO)
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            if subprocess.run(argv, env=env, capture_output=True).returncode == 0:
                break
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        for counter in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
            assert re.search(rf"^{counter}\{{.*model=\"{LINEAR.name}\"", text, re.MULTILINE), counter
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        if process.poll() is None:  # a failed assertion above: stop it the orderly way first
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()

