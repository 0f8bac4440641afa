"""LoRA: loading (keys, scaling), in-place fusing with bit-exact restore, the tiny adapter, the
serving registry and per-request routing, and ONNX export of fused variants.

Runs on the session's tiny checkpoint (``tiny_onnx_ckpt`` / ``tiny_onnx_components`` from
``fixtures_onnx``). Output comparisons: "changes" means a max relative change above 1e-2 (the
tiny adapter moves outputs by ~10%); "equal" is bit-exact where the arithmetic is identical, else
rel ≤ 1e-6 (fp32 re-association); ONNX parity ≤ 1e-4 relative (the export stage's tolerance).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from acestep_client.params import ParamError
from acestep_triton.export import specs
from acestep_triton.export.adapters import component_graph
from acestep_triton.export.onnx_export import FP32_RTOL, check_parity
from acestep_triton.lora import (
    ADAPTER_CONFIG_FILE,
    COMPONENT_OF_MODULE,
    LORA_WEIGHTS_FILE,
    METADATA_KEY,
    SERVING_FILE,
    VARIANTS_FILE,
    InProcessLoras,
    LoraError,
    LoraRegistry,
    LoraVariant,
    RoutingCall,
    ServedLoras,
    apply_lora,
    base_component,
    fused_transformer,
    load_lora,
    main,
    no_lora,
    prepare_lora_onnx_dir,
    read_variants_manifest,
    target_module_paths,
    variant_specs,
    write_tiny_lora,
    write_variants_manifest,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHANGED_REL = 1e-2
"""A LoRA must move an output by more than this (max abs change / max abs output)."""


# ------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_lora(tiny_onnx_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_lora(tiny_onnx_ckpt, tmp_path_factory.mktemp("lora") / "tiny", seed=0, rank=4)


@pytest.fixture(scope="module")
def transformer(tiny_onnx_components):
    return tiny_onnx_components.transformer


def _outputs(transformer, component: str, seed: int = 5) -> torch.Tensor:
    """One output tensor of ``component`` on fixed example inputs (B=2, length 9)."""
    graph = component_graph(component, transformer)
    inputs = graph.example_inputs(2, 9, seed=seed)
    with torch.no_grad():
        out = graph(*inputs.values())
    return (out if isinstance(out, torch.Tensor) else out[0]).clone()


def _session(path: Path):
    """One onnxruntime CPU session per file, shared by both comparisons (creation dominates)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _rewrite(src: Path, dst_dir: Path, *, drop_metadata: bool = False, config: bool = True,
             rename=lambda k: k, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of an adapter with its keys renamed / extra keys / no header metadata / no config."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / LORA_WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata()
        tensors = {rename(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors.update(extra or {})
    if drop_metadata:
        metadata = {"format": "pt"}
    save_file(tensors, str(dst_dir / LORA_WEIGHTS_FILE), metadata=metadata)
    if config:
        shutil.copy2(src / ADAPTER_CONFIG_FILE, dst_dir / ADAPTER_CONFIG_FILE)
    return dst_dir


# ---------------------------------------------------------------------------------- tiny adapter


def test_tiny_lora_layout_targets_and_determinism(tiny_lora: Path, tiny_onnx_ckpt: Path, tmp_path: Path,
                                                  transformer) -> None:
    again = write_tiny_lora(tiny_onnx_ckpt, tmp_path / "again", seed=0, rank=4)
    other = write_tiny_lora(tiny_onnx_ckpt, tmp_path / "other", seed=1, rank=4)
    data = (tiny_lora / LORA_WEIGHTS_FILE).read_bytes()
    assert (again / LORA_WEIGHTS_FILE).read_bytes() == data, "same seed must give byte-identical files"
    assert (other / LORA_WEIGHTS_FILE).read_bytes() != data, "the seed must matter"

    with safe_open(str(tiny_lora / LORA_WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()[METADATA_KEY])
    targets = target_module_paths(transformer)
    # upstream's zh_rap targets: speaker_embedder, 6 Conformer blocks x q/k/v, 24 DiT blocks x 2 attentions x 4
    assert len(targets) == 1 + 6 * 3 + 24 * 2 * 4, targets
    assert keys == {f"{t}.lora_{h}.weight" for t in targets for h in "AB"}
    assert header["r"] == 4 and header["lora_alpha"] == 8 and header["use_rslora"] is True
    assert json.loads((tiny_lora / ADAPTER_CONFIG_FILE).read_text())["peft_type"] == "LORA"

    adapter = load_lora(tiny_lora, transformer)
    assert adapter.components == ("condition_encoder", "dit_decoder")
    assert set(adapter.ranks.values()) == {4} and not adapter.ignored
    assert all(layer.up.abs().max() > 0 for layer in adapter.layers.values()), "lora_B must be non-zero"


def test_cli_writes_the_tiny_lora(tiny_onnx_ckpt: Path, tiny_lora: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiny", "--checkpoint", str(tiny_onnx_ckpt), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / LORA_WEIGHTS_FILE).read_bytes() == (tiny_lora / LORA_WEIGHTS_FILE).read_bytes()
    assert main(["inspect", str(tmp_path / "cli")]) == 0
    assert "211 layers" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 1


# ------------------------------------------------------------------------------------- loading


def test_scaling_modes_follow_upstream_and_peft(tiny_lora: Path, tmp_path: Path) -> None:
    r, alpha = 4, 8.0
    upstream = load_lora(tiny_lora)  # header metadata; set_scale ignores rslora -> alpha / r
    peft = load_lora(tiny_lora, scaling="peft")  # rsLoRA as trained -> alpha / sqrt(r)
    assert {layer.scaling for layer in upstream.layers.values()} == {alpha / r}
    assert {layer.scaling for layer in peft.layers.values()} == {alpha / math.sqrt(r)}
    assert upstream.settings.source == "metadata"

    bare = _rewrite(tiny_lora, tmp_path / "bare", drop_metadata=True)
    # upstream (diffusers) never reads adapter_config.json: alpha-less file -> alpha = r, scaling 1
    assert {layer.scaling for layer in load_lora(bare).layers.values()} == {1.0}
    peft_bare = load_lora(bare, scaling="peft")
    assert peft_bare.settings.source == ADAPTER_CONFIG_FILE
    assert {layer.scaling for layer in peft_bare.layers.values()} == {alpha / math.sqrt(r)}
    (bare / ADAPTER_CONFIG_FILE).unlink()
    assert {layer.scaling for layer in load_lora(bare, scaling="peft").layers.values()} == {1.0}
    with pytest.raises(ValueError, match="scaling"):
        load_lora(tiny_lora, scaling="kohya")


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model."])
def test_prefixed_keys_and_file_path_load_the_same_layers(tiny_lora: Path, tmp_path: Path, prefix: str,
                                                          transformer) -> None:
    reference = load_lora(tiny_lora)
    prefixed = _rewrite(tiny_lora, tmp_path / "p", rename=lambda k: prefix + k)
    adapter = load_lora(prefixed / LORA_WEIGHTS_FILE, transformer)  # the file itself, not the folder
    assert list(adapter.layers) == list(reference.layers)
    first = next(iter(adapter.layers))
    assert torch.equal(adapter.layers[first].up, reference.layers[first].up)


def test_unknown_keys_are_errors_naming_the_key(tiny_lora: Path, tmp_path: Path, transformer) -> None:
    pair = {"transformer_blocks.99.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer_blocks.99.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    bad = _rewrite(tiny_lora, tmp_path / "bad", extra=pair)
    load_lora(bad)  # a well-formed pair: only the model can tell it is not there
    with pytest.raises(LoraError, match=r"transformer_blocks\.99\.attn\.to_q\.lora_A\.weight"):
        load_lora(bad, transformer)

    for key, value in (("vocoder.conv.lora_A.weight", torch.zeros(4, 32)),
                       ("transformer_blocks.0.attn.to_q.alpha", torch.tensor(8.0)),
                       ("transformer_blocks.0.attn.to_q.lora_magnitude_vector", torch.ones(32))):
        folder = _rewrite(tiny_lora, tmp_path / key.replace(".", "_"), extra={key: value})
        with pytest.raises(LoraError, match=key.replace(".", r"\.")):
            load_lora(folder)

    shape = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 31)}
    folder = _rewrite(tiny_lora, tmp_path / "shape", rename=lambda k: k, extra=shape)
    with pytest.raises(LoraError, match=r"transformer_blocks\.0\.attn\.to_q\.lora_A\.weight.*do not fit"):
        load_lora(folder, transformer)
    with pytest.raises(LoraError, match=r"no pytorch_lora_weights\.safetensors"):
        load_lora(tmp_path)


def test_keys_of_unused_modules_are_ignored_like_upstream(tiny_lora: Path, tmp_path: Path, transformer) -> None:
    # cross_attn.add_q_proj exists upstream but inference never calls it: adapting it changes nothing
    unused = {"transformer_blocks.0.cross_attn.add_q_proj.lora_A.weight": torch.ones(4, 32),
              "transformer_blocks.0.cross_attn.add_q_proj.lora_B.weight": torch.ones(32, 4)}
    adapter = load_lora(_rewrite(tiny_lora, tmp_path / "u", extra=unused), transformer)
    assert sorted(adapter.ignored) == sorted(unused)
    assert len(adapter.layers) == len(load_lora(tiny_lora).layers)


def test_every_top_level_module_belongs_to_a_component(transformer) -> None:
    children = {name for name, _ in transformer.named_children()}
    assert children == set(COMPONENT_OF_MODULE), "lora.COMPONENT_OF_MODULE is out of date with the transformer"


# -------------------------------------------------------------------------------------- fusing


def test_apply_changes_encode_and_decode_and_restores_bit_exactly(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    before = {k: (v.clone(), v.data_ptr()) for k, v in transformer.state_dict().items()}
    base = {c: _outputs(transformer, c) for c in ("condition_encoder", "dit_decoder")}
    with apply_lora(transformer, adapter, 1.0):
        changed = {c: _rel(_outputs(transformer, c), base[c]) for c in base}
    for component, rel in changed.items():
        assert rel > CHANGED_REL, f"{component}: LoRA moved the output by only {rel:.2e} (max rel)"
    after = transformer.state_dict()
    mismatched = [k for k, (t, ptr) in before.items() if not torch.equal(after[k], t) or after[k].data_ptr() != ptr]
    assert not mismatched, f"not restored bit-exactly: {mismatched[:5]}"
    for component in base:
        assert torch.equal(_outputs(transformer, component), base[component])

    with pytest.raises(RuntimeError, match="boom"), apply_lora(transformer, adapter, 2.0):
        raise RuntimeError("boom")
    assert all(torch.equal(transformer.state_dict()[k], t) for k, (t, _) in before.items()), \
        "an error inside the block must still restore the weights"


def test_weight_zero_is_exactly_no_lora(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    base = _outputs(transformer, "dit_decoder")
    with apply_lora(transformer, adapter, 0.0):
        assert torch.equal(_outputs(transformer, "dit_decoder"), base)


def test_weight_scales_the_delta_linearly(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    paths = ["speaker_embedder", "lyric_encoder.encoders.5.self_attn.linear_v",
             "transformer_blocks.23.cross_attn.to_out.0"]
    original = {p: transformer.get_submodule(p).weight.detach().clone() for p in paths}
    deltas = {}
    for w in (1.0, 0.5, -1.5, 3.0):
        with apply_lora(transformer, adapter, w):
            deltas[w] = {p: transformer.get_submodule(p).weight.detach() - original[p] for p in paths}
    for p in paths:
        layer = adapter.layers[p]
        expected = layer.scaling * layer.up.float() @ layer.down.float()  # upstream: weight * alpha / r * B @ A
        err = float((deltas[1.0][p] - expected).abs().max() / expected.abs().max())
        assert err <= 1e-6, f"{p}: delta differs from scaling * B @ A by {err:.2e} (rel)"
        for w in (0.5, -1.5, 3.0):
            err = float((deltas[w][p] - w * deltas[1.0][p]).abs().max() / (w * deltas[1.0][p]).abs().max())
            assert err <= 1e-5, f"{p}: delta at weight {w} is not {w} x the delta at 1 (rel error {err:.2e})"


def test_fused_copy_equals_apply(tiny_lora: Path, transformer) -> None:
    adapter = load_lora(tiny_lora, transformer)
    base = _outputs(transformer, "dit_decoder")
    fused = fused_transformer(transformer, adapter, 0.7)
    assert torch.equal(_outputs(transformer, "dit_decoder"), base), "fused_transformer must not touch the original"
    with apply_lora(transformer, adapter, 0.7):
        for component in ("condition_encoder", "dit_decoder"):
            applied, copied = _outputs(transformer, component), _outputs(fused, component)
            assert torch.equal(applied, copied), f"{component}: max diff {(applied - copied).abs().max():.2e}"


# ---------------------------------------------------------------------------- registry, routing


def _registry_dir(tiny_lora: Path, root: Path) -> Path:
    for name in ("rap", "tiny"):
        shutil.copytree(tiny_lora, root / name)
    (root / "rap" / SERVING_FILE).write_text(json.dumps({"lora_weight": 0.5}))
    (root / ".hidden").mkdir()
    return root


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


def test_served_loras_route_requests_and_check_the_weight() -> None:
    seen: list[str] = []
    routing = RoutingCall(lambda model, inputs, outputs: seen.append(model) or [])
    rap = LoraVariant(name="rap", lora_weight=0.5, components=("condition_encoder", "dit_decoder"))
    served = ServedLoras(routing, [rap, LoraVariant(name="dec", lora_weight=1.0, components=("dit_decoder",))])

    with served("rap", 0.5):
        for component in ("text_encoder", "condition_encoder", "dit_decoder", "vocoder"):
            routing(component, {}, [])
    assert seen == ["text_encoder", "condition_encoder__rap", "dit_decoder__rap", "vocoder"]
    with served("dec", 1.0):
        routing("condition_encoder", {}, [])
        routing("dit_decoder", {}, [])
    with served("none", 2.5):  # lora_weight is ignored without an adapter, as upstream ignores it
        routing("dit_decoder", {}, [])
    assert seen[4:] == ["condition_encoder", "dit_decoder__dec", "dit_decoder"]
    assert routing.routes == {}

    with pytest.raises(ParamError) as info, served("rap", 1.0):
        pass
    assert info.value.field == "lora_weight" and "0.5" in str(info.value)
    with pytest.raises(ParamError) as info, served("jazz", 1.0):
        pass
    assert info.value.field == "lora_name_or_path" and "rap, dec" in str(info.value)
    with pytest.raises(ParamError) as info, no_lora("rap", 1.0):
        pass
    assert info.value.field == "lora_name_or_path"
    with no_lora("none", 1.0):
        pass
    assert base_component("dit_decoder__rap") == "dit_decoder" and base_component("vocoder") == "vocoder"


def test_in_process_scope_fuses_any_weight_and_restores(tiny_lora: Path, transformer) -> None:
    scope = InProcessLoras(transformer)
    base = _outputs(transformer, "dit_decoder")
    with scope(str(tiny_lora), 0.25):
        quarter = _outputs(transformer, "dit_decoder")
    with scope("none", 1.0):
        assert torch.equal(_outputs(transformer, "dit_decoder"), base)
    assert _rel(quarter, base) > CHANGED_REL / 10 and torch.equal(_outputs(transformer, "dit_decoder"), base)
    with pytest.raises(ParamError) as info, scope("/no/such/adapter", 1.0):
        pass
    assert info.value.field == "lora_name_or_path"


def test_variants_manifest_round_trip(tmp_path: Path) -> None:
    variants = [LoraVariant(name="rap", lora_weight=0.5, components=("condition_encoder", "dit_decoder"),
                            adapter_sha256="ab")]
    write_variants_manifest(variants, tmp_path)
    assert read_variants_manifest(tmp_path) == variants
    assert read_variants_manifest(tmp_path / "none") == []
    names = [s.name for s in variant_specs(variants)]
    assert names == ["condition_encoder__rap", "dit_decoder__rap"]
    assert variant_specs(variants)[1].inputs == specs.DIT_DECODER.inputs


# ----------------------------------------------------------------------------------- ONNX export


def test_export_lora_variants_matches_the_fused_model(tiny_lora: Path, tiny_onnx_components, tmp_path: Path) -> None:
    shutil.copytree(tiny_lora, tmp_path / "loras" / "rap")
    registry = LoraRegistry.from_dir(tmp_path / "loras", weights={"rap": 0.5})
    transformer = tiny_onnx_components.transformer
    base_dir, out = tmp_path / "base", tmp_path / "onnx"
    base_dir.mkdir()
    for name in ("text_encoder.onnx", "dit_decoder.onnx", "dit_decoder.onnx.data"):  # stand-ins: only linked
        (base_dir / name).write_bytes(name.encode())
    variants = prepare_lora_onnx_dir(tiny_onnx_components, registry, base_dir, out)
    assert [v.model_names for v in variants] == [["condition_encoder__rap", "dit_decoder__rap"]]
    assert read_variants_manifest(out) == variants
    manifest = json.loads((out / VARIANTS_FILE).read_text())["variants"][0]
    assert manifest["lora_weight"] == 0.5 and set(manifest["parity"]) == {"condition_encoder__rap", "dit_decoder__rap"}
    assert manifest["base_key"] and all(p["ok"] for p in manifest["parity"].values())
    assert all((out / n).samefile(base_dir / n) for n in ("text_encoder.onnx", "dit_decoder.onnx.data"))

    fused = fused_transformer(transformer, load_lora(registry.adapters["rap"], transformer), 0.5)
    for component in ("condition_encoder", "dit_decoder"):
        session = _session(out / f"{component}__rap.onnx")
        report = check_parity(component, fused, "", session=session)
        assert report.ok and report.max_rel <= FP32_RTOL, f"{component}: {report.summary()}"
        # the same inputs through the base weights: the file must hold the fused ones
        base = check_parity(component, transformer, "", session=session)
        assert base.max_rel > CHANGED_REL, f"{component}: variant matches the base model ({base.max_rel:.2e})"

    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*__*.onnx")}
    again = prepare_lora_onnx_dir(tiny_onnx_components, registry, base_dir, out)  # unchanged: reused
    assert again == variants and {p.name: p.stat().st_mtime_ns for p in out.glob("*__*.onnx")} == stamp
