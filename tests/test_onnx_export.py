"""ONNX export of the six served components: contract, dynamic axes, parity with torch, ERG.

Tolerance: fp32, relative error ``max|onnx - torch| / max|torch|`` ≤ 1e-4 per output, measured
at two shapes per component that differ from the traced example in batch and length (so a size
baked into a graph fails). Against upstream's golden numbers: ≤ 1e-4 absolute (arrays of order
1). Measured errors are in every assertion message.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from acestep_triton.checkpoint import (
    CheckpointLayout,
    Components,
    load_dcae,
    load_text_encoder,
    load_transformer,
    load_vocoder,
)
from acestep_triton.component_graphs import component_graph, component_sources
from acestep_triton.export import onnx_export, specs
from acestep_triton.export.onnx_export import (
    EXPORT_EXAMPLE,
    ParityError,
    check_parity,
    data_file,
    export_all,
    export_cached,
    export_component,
)
from acestep_triton.export.specs import read_onnx_sizes
from acestep_triton.models.dcae import denormalize_mel
from acestep_triton.sampling import erg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-4
ATOL_GOLDEN = 1e-4
NAMES = list(specs.COMPONENTS)
SHAPES = [(1, 1), (4, 19)]
"""(batch, length) of the parity checks: both unlike the traced example, the first at the lower
bound of every length (one latent frame / token / mel frame)."""
ONNX_TYPES = {"FP32": onnx.TensorProto.FLOAT, "INT64": onnx.TensorProto.INT64}
SCALED = {"text_encoder": erg.text_query_scale, "condition_encoder": erg.lyric_query_scale,
          "dit_decoder": erg.dit_query_scale}
"""Components with an ERG query-scale input, and the function giving its ERG row."""

assert all(shape[0] != EXPORT_EXAMPLE[0] and shape[1] != EXPORT_EXAMPLE[1] for shape in SHAPES)


@pytest.fixture(scope="module")
def sources(tiny_onnx_components: Components) -> dict[str, torch.nn.Module]:
    return component_sources(tiny_onnx_components)


@pytest.fixture(scope="module")
def sessions(tiny_onnx_paths: dict[str, Path]) -> dict[str, ort.InferenceSession]:
    return {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for name, path in tiny_onnx_paths.items()}


def _run_onnx(session: ort.InferenceSession, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _run_torch(name: str, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = component_graph(name, module)(*inputs.values())
    return [t.numpy() for t in ((out,) if isinstance(out, torch.Tensor) else out)]


def _rel(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max abs, max abs / max |want|) in float64."""
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    return err, err / max(float(np.abs(want).max()), 1e-30)


# ------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", NAMES)
def test_graph_io_is_the_contract(name: str, tiny_onnx_paths: dict[str, Path],
                                  tiny_onnx_components: Components) -> None:
    spec = specs.component(name)
    model = onnx.load(str(tiny_onnx_paths[name]), load_external_data=False)
    for kind, wanted, values in (("inputs", spec.inputs, model.graph.input),
                                 ("outputs", spec.outputs, model.graph.output)):
        got = [(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)) for v in values]
        want = [(t.name, onnx.TensorProto.DataType.Name(ONNX_TYPES[t.dtype])) for t in wanted]
        assert got == want, f"{name} {kind}: graph {got} != contract {want}"
        for t, v in zip(wanted, values, strict=True):
            dims = v.type.tensor_type.shape.dim
            assert len(dims) == len(t.shape), f"{name}.{t.name}: rank {len(dims)} != {list(t.shape)}"
            for axis, (symbol, dim) in enumerate(zip(t.shape, dims, strict=True)):
                if symbol in specs.DYNAMIC_SYMBOLS:
                    assert dim.dim_param and not dim.HasField("dim_value"), \
                        f"{name}.{t.name} axis {axis} ({symbol}) is not dynamic: {dim}"
                elif isinstance(symbol, int):
                    assert dim.dim_value == symbol, f"{name}.{t.name} axis {axis}: {dim} != {symbol}"

    # The renderer reads the checkpoint-fixed sizes from the file: they must be the config's.
    configs = tiny_onnx_components.configs
    umt5, dit = configs["umt5-base"], configs["ace_step_transformer"]
    width = dit["num_attention_heads"] * dit["attention_head_dim"]
    expected = {
        "text_encoder": {"Lt": umt5["num_layers"], "Ct": umt5["d_model"]},
        "condition_encoder": {"Ct": dit["text_embedding_dim"], "D": width,
                              "Ll": dit["lyric_encoder_num_blocks"]},
        "dit_decoder": {"D": width, "Ld": dit["num_layers"]},
    }.get(name, {})
    assert read_onnx_sizes(spec, tiny_onnx_paths[name]) == expected


def test_vocoder_is_exported_with_weight_norm_folded(tiny_onnx_paths: dict[str, Path],
                                                     sources: dict[str, torch.nn.Module]) -> None:
    model = onnx.load(str(tiny_onnx_paths["vocoder"]), load_external_data=False)
    names = [t.name for t in model.graph.initializer]
    assert not [n for n in names if n.endswith(("weight_g", "weight_v"))], names
    assert not {node.op_type for node in model.graph.node} & {"ReduceL2", "LpNormalization"}
    # Folding worked on a copy: the caller's vocoder still has its official parameters.
    assert any(n.endswith("weight_g") for n, _ in sources["vocoder"].named_parameters())


# -------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-L{s[1]}")
@pytest.mark.parametrize("name", NAMES)
def test_parity_with_torch_at_other_shapes(name: str, shape: tuple[int, int], sources: dict[str, Any],
                                           sessions: dict[str, ort.InferenceSession]) -> None:
    module = sources[name]
    inputs = component_graph(name, module).example_inputs(*shape, seed=11)
    got, want = _run_onnx(sessions[name], inputs), _run_torch(name, module, inputs)
    spec = specs.component(name)
    errors = {}
    for out_spec, g, w in zip(spec.outputs, got, want, strict=True):
        assert g.shape == w.shape, f"{name}.{out_spec.name}: onnx {g.shape} != torch {w.shape}"
        assert g.shape[0] == shape[0]
        assert np.isfinite(g).all(), f"{name}.{out_spec.name}: non-finite values"
        errors[out_spec.name] = _rel(g, w)
    message = f"{name} {dict((k, tuple(v.shape)) for k, v in inputs.items())}: " + ", ".join(
        f"{k} max abs {a:.3g} rel {r:.3g}" for k, (a, r) in errors.items())
    assert all(r <= RTOL for _, r in errors.values()), message

    # check_parity (what export_all runs) measures the same numbers.
    report = check_parity(name, module, "", inputs, session=sessions[name])
    assert report.ok, report.summary()
    assert report.max_rel == pytest.approx(max(r for _, r in errors.values()), rel=1e-6, abs=1e-12)


def test_dit_decoder_parity_at_the_longest_request(sources: dict[str, Any],
                                                   sessions: dict[str, ort.InferenceSession]) -> None:
    """W = 2583 latent frames (240 s): RoPE and masks come from runtime lengths, nothing caps W."""
    inputs = component_graph("dit_decoder", sources["dit_decoder"]).example_inputs(1, 2583, seed=5)
    report = check_parity("dit_decoder", sources["dit_decoder"], "", inputs, session=sessions["dit_decoder"])
    assert report.output_shapes["velocity"] == (1, 8, 16, 2583)
    assert report.ok, report.summary()


@pytest.mark.parametrize("name", sorted(SCALED))
def test_erg_query_scale_is_a_live_per_item_input(name: str, sources: dict[str, Any],
                                                  sessions: dict[str, ort.InferenceSession]) -> None:
    """Two copies of one item, row 0 with all-ones scales, row 1 with upstream's ERG layers at 0.01:
    ONNX must follow torch on both rows, and the ERG row must differ from the plain one."""
    module = sources[name]
    spec = specs.component(name)
    (scale_name,) = [t.name for t in spec.inputs if t.name.endswith("query_scale")]
    single = component_graph(name, module).example_inputs(1, 9, seed=3)
    inputs = {k: torch.cat([v, v]) for k, v in single.items()}
    layers = single[scale_name].shape[-1]
    inputs[scale_name] = torch.stack([SCALED[name](layers, erg=False), SCALED[name](layers, erg=True)])
    assert (inputs[scale_name][1] == erg.ERG_TAU).any(), "the checkpoint has none of the ERG layers"

    got, want = _run_onnx(sessions[name], inputs), _run_torch(name, module, inputs)
    first_got, first_want = got[0], want[0]
    abs_err, rel_err = _rel(first_got, first_want)
    assert rel_err <= RTOL, f"{name} with ERG rows: max abs {abs_err:.3g}, rel {rel_err:.3g}"
    change_abs, change_rel = _rel(first_got[1], first_got[0])
    assert change_rel > 1e-3, f"{name}: ERG row differs from the plain row only by {change_abs:.3g} " \
                              f"(rel {change_rel:.3g}): the query scale has no effect"
    # Row 0 is unaffected by row 1's scales: the same as the single plain item.
    plain = {**single, scale_name: inputs[scale_name][:1]}
    alone_abs, alone_rel = _rel(first_got[0], _run_onnx(sessions[name], plain)[0][0])
    assert alone_rel <= RTOL, f"{name}: batching with an ERG row changed the plain row by {alone_abs:.3g}"


# ------------------------------------------------------------------------ files and failures


def test_external_data_goes_to_one_file_next_to_the_graph(tmp_path: Path, sources: dict[str, Any]) -> None:
    path = export_component("dcae_decoder", sources["dcae_decoder"], tmp_path / "dcae_decoder.onnx",
                            external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "no initializer was moved out of the graph"
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert locations == {data_file(path).name} == {"dcae_decoder.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcae_decoder.onnx", "dcae_decoder.onnx.data"]
    report = check_parity("dcae_decoder", sources["dcae_decoder"], path)
    assert report.ok, report.summary()


def test_per_tensor_external_files_are_merged(tmp_path: Path, sources: dict[str, Any],
                                              tiny_onnx_paths: dict[str, Path]) -> None:
    """Above 2 GB torch writes one file per tensor; publishing merges them into one data file."""
    from onnx.external_data_helper import convert_model_to_external_data

    traced = tmp_path / "traced" / "vocoder.onnx"
    traced.parent.mkdir()
    model = onnx.load(str(tiny_onnx_paths["vocoder"]))
    convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=256)
    onnx.save(model, str(traced))
    assert len(list(traced.parent.iterdir())) > 10  # as torch leaves it: many files

    out = tmp_path / "out" / "vocoder.onnx"
    out.parent.mkdir()
    onnx_export._publish(traced, out, specs.component("vocoder"), None)
    assert sorted(p.name for p in out.parent.iterdir()) == ["vocoder.onnx", "vocoder.onnx.data"]
    report = check_parity("vocoder", sources["vocoder"], out)
    assert report.ok, report.summary()


def test_export_all_fails_loudly_when_onnx_and_torch_disagree(tmp_path: Path, sources: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph traced from other weights than the module it is checked against must not pass."""
    original = onnx_export.export_graph

    def perturbed(name: str, module: torch.nn.Module) -> torch.nn.Module:
        graph = copy.deepcopy(original(name, module))
        with torch.no_grad():
            for p in graph.parameters():
                p.mul_(1.01)
        return graph

    monkeypatch.setattr(onnx_export, "export_graph", perturbed)
    with pytest.raises(ParityError, match=r"dcae_decoder .*max rel") as info:
        export_all({"dcae_decoder": sources["dcae_decoder"]}, tmp_path, progress=False)
    assert "FAILED" in str(info.value)


def test_cli_exports_the_selected_components_with_progress(tiny_onnx_ckpt: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "onnx"
    assert onnx_export.main(["--checkpoint", str(tiny_onnx_ckpt), "--out", str(out),
                             "--only", "dcae_decoder", "--skip-parity"]) == 0
    assert (out / "dcae_decoder.onnx").is_file() and not (out / "vocoder.onnx").exists()
    err = capsys.readouterr().err
    assert "[onnx 1/1] dcae_decoder: exporting" in err and "s elapsed" in err, err
    with pytest.raises(SystemExit):
        onnx_export.main(["--checkpoint", str(tiny_onnx_ckpt), "--out", str(out), "--only", "dit"])


def test_export_cache_reuses_the_files(tiny_onnx_ckpt: Path, tiny_onnx_paths: dict[str, Path],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tiny_onnx_paths["dit_decoder"].parent.parent
    mtimes = {n: p.stat().st_mtime_ns for n, p in tiny_onnx_paths.items()}

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache exported again instead of reusing its files")

    monkeypatch.setattr(onnx_export, "export_all", no_export)
    again = export_cached(tiny_onnx_ckpt, cache_dir)
    assert again == tiny_onnx_paths
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == mtimes
    # The fingerprint covers the checkpoint bytes.
    assert onnx_export.checkpoint_fingerprint(tiny_onnx_ckpt) != onnx_export.checkpoint_fingerprint(
        tiny_onnx_ckpt / "music_vocoder")


# ---------------------------------------------------------------- upstream numbers via ONNX


@pytest.fixture(scope="module")
def golden_onnx(golden_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``export(name) -> (session, module)`` for the golden checkpoint, each exported on first use."""
    layout = CheckpointLayout(golden_ckpt)
    out_dir = tmp_path_factory.mktemp("golden_onnx")
    loaded: dict[str, Any] = {}
    cache: dict[str, tuple[ort.InferenceSession, torch.nn.Module]] = {}

    def module(name: str) -> torch.nn.Module:
        if name in ("dcae_encoder", "dcae_decoder"):
            if "dcae" not in loaded:
                loaded["dcae"] = load_dcae(layout)
            return loaded["dcae"][0 if name == "dcae_encoder" else 1]
        if name in ("condition_encoder", "dit_decoder"):
            if "transformer" not in loaded:
                loaded["transformer"] = load_transformer(layout)
            return loaded["transformer"]
        return {"text_encoder": load_text_encoder, "vocoder": load_vocoder}[name](layout)

    def export(name: str) -> tuple[ort.InferenceSession, torch.nn.Module]:
        if name not in cache:
            m = module(name)
            path = export_component(name, m, out_dir / f"{name}.onnx")
            cache[name] = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), m)
        return cache[name]

    return export


def _golden_case(name: str, g: dict[str, np.ndarray],
                 layers: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Contract inputs and the expected first output, from upstream's recorded component calls.
    Components with a query scale get the plain and the ERG call in one batch (per-row scales)."""
    def twice(*arrays: np.ndarray) -> list[np.ndarray]:
        return [np.concatenate([a, a]) for a in arrays]

    def rows(items: int) -> np.ndarray:  # plain scales for the first copy, ERG for the second
        fn = SCALED[name]
        plain, weak = fn(layers, erg=False).numpy(), fn(layers, erg=True).numpy()
        return np.concatenate([np.repeat(plain[None], items, 0), np.repeat(weak[None], items, 0)])

    if name == "dcae_encoder":
        return {"mel": g["dcae_enc_mel_logmel"]}, g["dcae_enc_out_latents"]
    if name == "dcae_decoder":
        want = denormalize_mel(torch.from_numpy(g["dcae_dec_raw_decoder_out"])).numpy()
        return {"latents": g["dcae_dec_in_latents"]}, want
    if name == "vocoder":
        return {"mel": g["voc_in_mel"]}, g["voc_out_wav"]
    if name == "text_encoder":
        ids, mask = twice(g["umt5_batch2_input_ids"], g["umt5_batch2_attention_mask"])
        want = np.concatenate([g["umt5_batch2_last_hidden_state"], g["umt5_batch2_erg_last_hidden_state"]])
        return {"input_ids": ids, "attention_mask": mask, "query_scale": rows(len(ids) // 2)}, want
    if name == "condition_encoder":
        states, text_mask, speaker, lyric_ids, lyric_mask = twice(
            g["enc_in_text_states"], g["enc_in_text_mask"], g["enc_in_speaker"], g["enc_in_lyric_ids"],
            g["enc_in_lyric_mask"])
        want = np.concatenate([g["enc_out_states"], g["enc_out_states_erg_lyric_q0.01_layers4_5"]])
        return {"text_states": states, "text_mask": text_mask, "speaker": speaker, "lyric_ids": lyric_ids,
                "lyric_mask": lyric_mask, "lyric_query_scale": rows(len(states) // 2)}, want
    latents, latent_mask, enc_states, enc_mask, timestep = twice(
        g["dec_in_hidden"], g["dec_in_attention_mask"], g["enc_out_states"], g["enc_out_mask"],
        g["dec_in_timestep"])
    want = np.concatenate([g["dec_out"], g["dec_out_erg_diffusion_q0.01_blocks15_19"]])
    return {"latents": latents, "latent_mask": latent_mask, "encoder_states": enc_states,
            "encoder_mask": enc_mask, "timestep": timestep, "query_scale": rows(len(latents) // 2)}, want


GOLDEN_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in ("condition_encoder", "dit_decoder") else n
                for n in NAMES]
"""The golden transformer carries upstream's full-size lyric Conformer (83M parameters, a 360 MB
condition-encoder graph) and 24 blocks: about 5 s per export, hence ``slow``."""


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_onnx_reproduces_upstream_golden_numbers(name: str, golden_onnx: Any,
                                                 golden_components: dict[str, np.ndarray]) -> None:
    session, module = golden_onnx(name)
    spec = specs.component(name)
    layers = 0
    if name in SCALED:
        (scale,) = [t for t in spec.inputs if t.name.endswith("query_scale")]
        layers = component_graph(name, module).checkpoint_sizes()[scale.shape[-1]]
    inputs, want = _golden_case(name, golden_components, layers)
    assert list(inputs) == list(spec.input_names)
    got = session.run(None, inputs)[0]
    assert got.shape == want.shape, f"{name}: {got.shape} != upstream {want.shape}"
    err, rel = _rel(got, want)
    assert err <= ATOL_GOLDEN, f"{name}: ONNX vs upstream max abs {err:.3g} (rel {rel:.3g})"
