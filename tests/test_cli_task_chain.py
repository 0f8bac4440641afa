"""Every task from the command line (``acestep-client generate``) against the real tiny server,
chained the way a user works: generate, then retake / repaint / extend / edit / audio2audio it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from acestep_client.cli import main as client_main
from acestep_triton.cli import main as project_main
from acestep_triton.serving.server import TritonServer

COMMON = ["--steps", "4", "--quiet"]


def run(server: TritonServer, out: Path, *args: str) -> list[Path]:
    """Run ``acestep-client generate`` and return the audio files it wrote."""
    assert client_main(["generate", "--url", server.grpc_url, "--out", str(out), *COMMON, *args]) == 0
    return sorted(p for p in out.iterdir() if p.suffix in (".wav", ".flac", ".ogg", ".mp3"))


def seconds(path: Path) -> float:
    info = sf.info(str(path))
    return info.frames / info.samplerate


def test_every_task_from_the_cli(tiny_server: TritonServer, tmp_path: Path) -> None:
    (song,) = run(tiny_server, tmp_path / "t2m", "--prompt", "pop, guitar", "--lyrics", "[verse]\nla la",
                  "--duration", "3", "--seeds", "5")
    params = song.with_name(song.stem + "_params.json")
    assert json.loads(params.read_text())["actual_seeds"] == [5]

    (retake,) = run(tiny_server, tmp_path / "retake", "--params-json", str(params), "--task", "retake",
                    "--retake-variance", "0.0", "--retake-seeds", "9")
    assert sf.read(str(retake))[0].tolist() == sf.read(str(song))[0].tolist(), "variance 0 must reproduce"

    (repaint,) = run(tiny_server, tmp_path / "repaint", "--task", "repaint", "--src-audio", str(song),
                     "--repaint-start", "1", "--repaint-end", "2")
    (extend,) = run(tiny_server, tmp_path / "extend", "--task", "extend", "--src-audio", str(song),
                    "--right-extend-length", "2", "--format", "flac")
    (edit,) = run(tiny_server, tmp_path / "edit", "--task", "edit", "--src-audio", str(song),
                  "--edit-type", "remix", "--edit-target-prompt", "rock", "--format", "ogg")
    (a2a,) = run(tiny_server, tmp_path / "a2a", "--task", "audio2audio", "--ref-audio", str(song),
                 "--ref-audio-strength", "0.5", "--format", "mp3")
    assert abs(seconds(extend) - seconds(song) - 2.0) < 0.2
    for path in (repaint, edit, a2a):
        assert abs(seconds(path) - seconds(song)) < 0.2, path


def test_cli_reports_bad_input_with_the_field(tiny_server: TritonServer, tmp_path: Path, capsys) -> None:
    code = client_main(["generate", "--url", tiny_server.grpc_url, "--out", str(tmp_path), "--steps", "0"])
    assert code == 2 and "infer_step" in capsys.readouterr().err
    code = client_main(["generate", "--url", tiny_server.grpc_url, "--out", str(tmp_path), "--task", "repaint",
                        "--src-audio", str(tmp_path / "missing.wav"), "--repaint-end", "1"])
    assert code == 2 and "src_audio" in capsys.readouterr().err


def test_local_cli_matches_the_server(tiny_server: TritonServer, tiny_onnx_ckpt: Path, tmp_path: Path) -> None:
    args = ["--prompt", "jazz", "--duration", "2", "--seeds", "3", *COMMON]
    (served,) = run(tiny_server, tmp_path / "served", *args[:-3])
    assert project_main(["generate", "--local", "--checkpoint", str(tiny_onnx_ckpt), "--out",
                         str(tmp_path / "local"), *args]) == 0
    (local,) = sorted((tmp_path / "local").glob("*.wav"))
    a, b = sf.read(str(served))[0], sf.read(str(local))[0]
    assert a.shape == b.shape and abs(a - b).max() < 1e-4


def test_local_cli_refuses_an_unusable_device(tiny_onnx_ckpt: Path, tmp_path: Path, capsys) -> None:
    base = ["generate", "--local", "--checkpoint", str(tiny_onnx_ckpt), "--out", str(tmp_path), *COMMON]
    assert project_main([*base, "--device", "cudaa"]) == 2
    assert "--device: 'cudaa' is not a torch device" in capsys.readouterr().err
    assert project_main([*base, "--device", "meta"]) == 2
    assert "only cpu and cuda devices are supported" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert project_main([*base, "--device", "cuda"]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.in_process  # starts no server: runs niced beside the alone tests (tests/parallel_plan.py)
def test_local_cli_needs_no_tritonclient(tiny_onnx_ckpt: Path, tmp_path: Path) -> None:
    """In-process generation (e.g. on a GPU box without the serving stack) writes its files
    without importing tritonclient."""
    code = f"""
import importlib.abc, sys

class NoTritonClient(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tritonclient":
            raise ImportError("tritonclient is not installed here")

sys.meta_path.insert(0, NoTritonClient())
from acestep_triton.cli import main
code = main(["generate", "--local", "--checkpoint", {str(tiny_onnx_ckpt)!r}, "--out", {str(tmp_path)!r},
             "--duration", "1", "--steps", "2", "--quiet", "--name", "song"])
assert code == 0, code
assert not [m for m in sys.modules if m.startswith("tritonclient")]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sf.info(str(tmp_path / "song_0.wav")).frames > 0
    assert json.loads((tmp_path / "song_0_params.json").read_text())["infer_step"] == 2
