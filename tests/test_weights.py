"""Loading weights without a random model beside them: the safetensors reader, meta-device
materialisation, and what each served component reads.

The load-memory property (issue: peak RSS during a component's load at most ~1.3x the steady RSS
of its process) is measured in a fresh process on a mid-size DiT (width 1280, 8 blocks: 0.8 GB of
fp32 weights), with ``/proc`` as ``serving/memory.py`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_benchmarks_smoke import load_benchmark
from torch import nn

from acestep_triton.checkpoint import (
    TRANSFORMER_DIR,
    CheckpointLayout,
    load_dcae_half,
    load_transformer,
)
from acestep_triton.serving.torch_runtime import DECODE_ONLY, ENCODE_ONLY, load_component_module
from acestep_triton.synthetic.full_size import TRANSFORMER_CONFIG, FullSizeConfigs, write_full_random_checkpoint
from acestep_triton.synthetic.tiny_checkpoint import (
    tiny_dcae_config,
    tiny_text_encoder_config,
    tiny_vocoder_config,
    write_tiny_checkpoint,
)
from acestep_triton.weights import (
    CheckpointError,
    SafetensorsFile,
    materialize,
)

LOAD_PEAK_OVER_STEADY = 1.3


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("weights_tiny") / "ckpt", seed=0)


# ---------------------------------------------------------------------------------- the reader
def test_reader_matches_safetensors_for_every_dtype(tmp_path: Path) -> None:
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16), "i64": torch.arange(6),
               "f16": torch.randn(2, 2).half(), "empty": torch.zeros(0, 3), "flag": torch.tensor([True, False])}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    file = SafetensorsFile(path)
    assert set(file) == set(tensors)
    for key, value in tensors.items():
        assert file.shape(key) == tuple(value.shape)
        assert file.dtype(key) == value.dtype
        assert torch.equal(file[key], value), key
    assert torch.equal(file.read("bf16", torch.float32), tensors["bf16"].float())
    assert file.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())


def _corrupt(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_reader_refuses_malformed_files_naming_them(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(good))
    raw = good.read_bytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 64 * 64 * 4 + 4]}}).encode()
    cases = {
        "empty": b"",
        "huge_header": (2**60).to_bytes(8, "little") + b"{}",
        "not_json": (5).to_bytes(8, "little") + b"xxxxx",
        "truncated": raw[: len(raw) - 100],
        "offsets_past_end": len(header).to_bytes(8, "little") + header + bytes(64 * 64 * 4 + 4),
    }
    for name, data in cases.items():
        path = _corrupt(tmp_path, name, data)
        with pytest.raises(CheckpointError, match=name):
            SafetensorsFile(path)


# ---------------------------------------------------------------------------------- materialize
class TiedEmbeddings(nn.Module):
    """Two embeddings sharing one weight: ``inner.weight`` is ``shared.weight`` (as the
    checkpoints tie some of theirs), for the strict loaders' ``tied`` mapping."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(4, 2)
        self.inner = nn.Embedding(4, 2)
        self.inner.weight = self.shared.weight


class _Tied(TiedEmbeddings):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 3)
        self.tail = nn.Linear(3, 3)


def _state(tmp_path: Path, **extra: torch.Tensor) -> SafetensorsFile:
    torch.manual_seed(0)
    state = {"shared.weight": torch.randn(4, 2), "head.weight": torch.randn(3, 2), "head.bias": torch.randn(3),
             "tail.weight": torch.randn(3, 3), "tail.bias": torch.randn(3), **extra}
    path = tmp_path / "tied.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))
    return SafetensorsFile(path)


def test_materialize_fills_tied_parameters_once_and_casts(tmp_path: Path) -> None:
    state = _state(tmp_path)
    module = materialize(_Tied, state, (), "tied", tied={"inner.weight": "shared.weight"})
    assert module.inner.weight is module.shared.weight
    assert module.head.weight.dtype == torch.float32 and not module.head.weight.requires_grad
    assert torch.equal(module.head.weight, state["head.weight"].float())
    assert not any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def test_materialize_is_as_strict_as_loading_the_whole_module(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        materialize(_Tied, _state(tmp_path, stray=torch.zeros(1)), (), "tied", tied={"inner.weight": "shared.weight"})
    assert "unexpected keys (1)" in str(info.value) and "stray" in str(info.value)
    with pytest.raises(CheckpointError, match=r"inner\.weight"):
        materialize(_Tied, _state(tmp_path), (), "tied")  # without the tie, inner.weight is missing


def test_dropped_submodules_are_checked_but_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state(tmp_path)
    read: list[str] = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, key, dtype=None: read.append(key) or original(
        self, key, dtype))
    module = materialize(_Tied, state, (), "tied", tied={"inner.weight": "shared.weight"}, drop=("tail",))
    assert module.tail is None
    assert sorted(read) == ["head.bias", "head.weight", "shared.weight"]
    with pytest.raises(CheckpointError, match=r"tail\.bias"):  # a wrong shape in a dropped half still fails
        bad = _state(tmp_path, **{"tail.bias": torch.zeros(7)})
        materialize(_Tied, bad, (), "tied", tied={"inner.weight": "shared.weight"}, drop=("tail",))


# ---------------------------------------------------------------------------------- components
def _file_keys(ckpt: Path, folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(CheckpointLayout(ckpt).weights_path(folder)))


@pytest.mark.parametrize("name, dropped", [("condition_encoder", DECODE_ONLY), ("dit_decoder", ENCODE_ONLY)])
def test_transformer_halves_hold_and_read_only_what_they_serve(
        tiny_ckpt: Path, name: str, dropped: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, key, dtype=None: read.append(key) or original(
        self, key, dtype))
    module = load_component_module(name, tiny_ckpt)
    assert all(getattr(module, sub) is None for sub in dropped)
    assert read and not [k for k in read if k.split(".")[0] in dropped]
    on_disk = _file_keys(tiny_ckpt, TRANSFORMER_DIR)
    for key, value in module.state_dict().items():
        assert torch.equal(value, on_disk[key].float()), key


def test_each_dcae_model_reads_only_its_half(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, key, dtype=None: read.append(key) or original(
        self, key, dtype))
    layout = CheckpointLayout(tiny_ckpt)
    for half in ("encoder", "decoder"):
        read.clear()
        module = load_dcae_half(layout, half)
        assert read and all(k.startswith(f"{half}.") for k in read), half
        assert len(read) == len(module.state_dict())


def test_bf16_load_reads_straight_into_the_served_dtype(tiny_ckpt: Path) -> None:
    module = load_transformer(CheckpointLayout(tiny_ckpt), torch.bfloat16, drop=ENCODE_ONLY)
    on_disk = _file_keys(tiny_ckpt, TRANSFORMER_DIR)
    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    assert all(torch.equal(v, on_disk[k]) for k, v in module.state_dict().items())


# ---------------------------------------------------------------------------------- memory
@pytest.fixture(scope="module")
def mid_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DiT 1280 wide with 8 blocks (0.8 GB of fp32 decoder weights), small codecs."""
    text = tiny_text_encoder_config(0)
    del text["vocab_size"]
    dit = {**TRANSFORMER_CONFIG, "num_layers": 8, "num_attention_heads": 10, "inner_dim": 1280,
           "text_embedding_dim": text["d_model"]}
    configs = FullSizeConfigs(dit, tiny_dcae_config(), tiny_vocoder_config(), text)
    return write_full_random_checkpoint(tmp_path_factory.mktemp("mid") / "ckpt", configs=configs)


def test_load_peak_stays_near_the_steady_size_of_the_process(mid_ckpt: Path) -> None:
    # in a fresh process, as a served model loads it (benchmarks/load_probe.py, also full_size.py's probe)
    figures = load_benchmark("load_probe").probe_load("dit_decoder", mid_ckpt)
    assert "error" not in figures, figures
    assert figures["weights"] > 600 * 2**20, figures  # the weights dominate the process
    ratio = figures["peak_rss"] / figures["steady_rss"]
    assert ratio <= LOAD_PEAK_OVER_STEADY, f"peak RSS during load {ratio:.2f}x the steady RSS: {figures}"
    held = figures["steady_rss"] - figures["base_rss"]
    # the bound for a served process: what loading adds is at most 1.25x the weights
    # (the first load also imports the model modules: ~0.1 GB here)
    assert held <= 1.25 * figures["weights"], f"the process holds {held / figures['weights']:.2f}x its weights"

