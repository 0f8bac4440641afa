"""The configured adapter folder (``acestep_triton.lora.registry``): names, strengths, refusals.

Runs on the session's tiny checkpoint; helpers and tolerances in ``lora_helpers``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lora_helpers import _registry_dir
from lora_helpers import tiny_lora as tiny_lora
from lora_helpers import transformer as transformer

from acestep_client.params import ParamError
from acestep_triton.lora import (
    LoraError,
    LoraRegistry,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry_resolves_names_and_rejects_the_rest(tiny_lora: Path, tmp_path: Path) -> None:
    registry = LoraRegistry.from_dir(_registry_dir(tiny_lora, tmp_path / "loras"))
    assert registry.names == ["rap", "tiny"]
    assert registry.weight("rap") == 0.5 and registry.weight("tiny") == 1.0
    for none in ("none", "NONE", "", None):
        assert registry.resolve(none) is None
    assert registry.resolve("rap") == tmp_path / "loras" / "rap"
    for bad in ("jazz", str(tiny_lora)):  # unknown names, and paths: a server never opens files a request names
        with pytest.raises(ParamError) as info:
            registry.resolve(bad)
        assert info.value.field == "lora_name_or_path" and "rap, tiny" in str(info.value)

    assert LoraRegistry.from_dir(tmp_path / "loras", weights={"tiny": -2.0}).weight("tiny") == -2.0
    with pytest.raises(LoraError, match="jazz"):
        LoraRegistry.from_dir(tmp_path / "loras", weights={"jazz": 1.0})
    (tmp_path / "loras" / "empty").mkdir()
    with pytest.raises(LoraError, match="empty"):
        LoraRegistry.from_dir(tmp_path / "loras")
    (tmp_path / "loras" / "empty").rmdir()
    shutil.copytree(tiny_lora, tmp_path / "loras" / "a__b")
    with pytest.raises(LoraError, match="a__b"):
        LoraRegistry.from_dir(tmp_path / "loras")

