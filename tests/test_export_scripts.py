"""The top-level ``export/`` scripts: they run, stay out of the package, and share the CLI's code.

The scripts are meant to be thin entry points over :mod:`acestep_triton.export` (a newcomer
reads the export stage off the tree), so the tests pin exactly that: each one answers
``--help`` as a separate process started outside the repository, none can shadow a real module
when Python puts ``export/`` first on ``sys.path``, and the assets + render scripts write the
same assets and repository as ``acestep-triton build``. The comparison uses the ``torch``
runtime, which needs no ONNX export, so this file costs a few seconds rather than an export.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import acestep_triton.export
from acestep_triton.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXPORT_DIR = ROOT / "export"
SCRIPTS = {
    # script → the ``acestep-triton`` command it stands for (its --help names it)
    "export_onnx.py": "acestep-triton onnx",
    "build_engines.py": "acestep-triton trt",
    "write_assets.py": "acestep-triton assets",
    "render_repository.py": "render",
}


def run_script(name: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``export/<name>`` the way the README does, in a fresh interpreter (the venv's)."""
    done = subprocess.run([sys.executable, str(EXPORT_DIR / name), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def tree(folder: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_help_runs(script: str, tmp_path: Path) -> None:
    """Started from elsewhere (not the repository root), each script answers ``--help``."""
    out = run_script(script, "--help", cwd=tmp_path).stdout
    assert out.startswith("usage:") and SCRIPTS[script] in out, out


def test_scripts_stay_out_of_the_package() -> None:
    """``export/`` is neither built into the wheel nor a rival to ``acestep_triton.export``, and
    no script is named like a module the package imports (running a script puts ``export/``
    first on ``sys.path``, so ``tensorrt.py`` there would shadow TensorRT)."""
    import tomllib  # Python 3.11+, like tests/test_docker.py

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["where"] == ["src"]
    assert not (EXPORT_DIR / "__init__.py").exists()
    assert Path(acestep_triton.export.__file__).resolve().parent == ROOT / "src" / "acestep_triton" / "export"
    assert sorted(p.name for p in EXPORT_DIR.glob("*.py")) == sorted(SCRIPTS)
    shadowed = [s for s in SCRIPTS if importlib.util.find_spec(Path(s).stem) is not None]
    assert not shadowed, f"export/ scripts named like importable modules: {shadowed}"


@pytest.fixture(scope="module")
def script_assets(tiny_onnx_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Step 3 of export/README.md: the assets folder, written by ``write_assets.py``."""
    steps = tmp_path_factory.mktemp("steps")
    run_script("write_assets.py", "--checkpoint", tiny_onnx_ckpt, "--out", steps / "assets", cwd=steps)
    return steps / "assets"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_render_script_matches_build(target: str, tiny_onnx_ckpt: Path, script_assets: Path,
                                     tmp_path: Path) -> None:
    """``write_assets.py`` + ``render_repository.py`` give what ``acestep-triton build`` gives:
    the same assets bytes, the same repository files, and the same ``config.pbtxt`` texts once
    the (absolute) assets path each endpoint names is the build's."""
    workdir = tmp_path / "build"
    assert cli_main(["build", "--checkpoint", str(tiny_onnx_ckpt), "--workdir", str(workdir),
                     "--target", target, "--runtime", "torch"]) == 0
    assert tree(script_assets) == tree(workdir / "assets")

    rendered = tmp_path / "steps" / "repository"
    run_script("render_repository.py", "--target", target, "--runtime", "torch", "--checkpoint", tiny_onnx_ckpt,
               "--assets", script_assets, "--out", rendered, cwd=tmp_path)
    built, ours = tree(workdir / "repository"), tree(rendered)
    assert sorted(ours) == sorted(built)
    configs = [name for name in built if name.endswith("/config.pbtxt")]
    assert len(configs) > 6  # the six components and the endpoints
    swap = (str(script_assets.resolve()), str((workdir / "assets").resolve()))
    for name in built:
        if name in configs:
            assert ours[name].decode().replace(*swap) == built[name].decode(), name
        else:
            assert ours[name] == built[name], name
