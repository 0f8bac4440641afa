"""Session fixtures: the tiny random checkpoint and its six ONNX components, made once per run.

Exporting the tiny checkpoint takes tens of seconds (the 24-block DiT dominates), so every test
that needs the ONNX files (the export tests, the Triton end-to-end tests) should share these
fixtures: import them into the test module (``from fixtures_onnx import tiny_onnx_dir  # noqa: F401``)
or register this module in the root conftest (``pytest_plugins = ["fixtures_onnx"]``).

The export goes through :func:`acestep_triton.export.onnx_export.export_cached` (parity checked).
Its cache lives in the session's temporary folder unless ``ACESTEP_ONNX_CACHE`` names a folder,
in which case files are reused across runs for as long as the checkpoint bytes and the export
and model sources are unchanged (the cache key covers them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from acestep_triton.checkpoint import Components, load_components
from acestep_triton.export.onnx_export import export_cached
from acestep_triton.synthetic.tiny_checkpoint import write_tiny_checkpoint

TINY_SEED = 0


@contextmanager
def single_thread() -> Iterator[None]:
    """One torch thread for tiny models: on a shared 2-core runner, multi-threaded kernels on
    tensors this small spend their time waiting for each other (measured: first vocoder call
    4.8 s with 2 threads, 0.16 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """:func:`single_thread` for a whole test module (``pytest.mark.usefixtures``)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_onnx_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random checkpoint (official layout, seed 0) the ONNX files are exported from."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_onnx") / "ckpt", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_onnx_components(tiny_onnx_ckpt: Path) -> Components:
    """The torch models of :func:`tiny_onnx_ckpt` (fp32), the reference the ONNX files match."""
    return load_components(tiny_onnx_ckpt)


@pytest.fixture(scope="session")
def tiny_onnx_paths(tiny_onnx_ckpt: Path, tiny_onnx_components: Components,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Component name → ``<component>.onnx`` of the tiny checkpoint, all in one folder."""
    cache = os.environ.get("ACESTEP_ONNX_CACHE")
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("onnx_cache")
    with single_thread():
        return export_cached(tiny_onnx_ckpt, cache_dir, components=tiny_onnx_components)


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_onnx_paths: dict[str, Path]) -> Path:
    """The folder holding the six ``<component>.onnx`` files (what the renderer's ``onnx_dir`` takes)."""
    folders = {p.parent for p in tiny_onnx_paths.values()}
    assert len(folders) == 1, folders
    return folders.pop()
