"""``benchmarks/full_size.py`` at a reduced size, so the full-size path does not rot.

The smoke run takes the very code path of the 3.5B measurement (random checkpoint written by
``synthetic.full_size`` in the official layout, the torch-runtime CPU repository through a real
tritonserver, one request per task plus a live LoRA request, the load probes in fresh
processes) on a 2-block, 32-wide model with short audio. The figures themselves are not judged
here (no timed asserts); what is checked is that every section produced its figures and that the
invariants hold at any size: finite audio, identical requests give identical audio, every task
ran the DiT through Triton, every component loaded without a random model beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("text2music", "retake", "repaint", "extend", "edit", "audio2audio")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("full_size_smoke")
    out = workdir / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "full_size.py"), "--smoke", "--workdir",
                           str(workdir), "--json", str(out)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(out.read_text())
    data["stdout"] = done.stdout
    return data


def test_every_section_printed_its_table(report: dict) -> None:
    for title in ("Reading the checkpoint's weight files once", "Loading one component in a fresh process",
                  "Serving: ready in", "Requests through Triton", "Goals"):
        assert title in report["stdout"], title


def test_every_task_and_the_lora_request_gave_finite_audio_through_the_dit(report: dict) -> None:
    labels = [r["label"] for r in report["requests"]]
    for task in TASKS:
        assert any(label.startswith(task) for label in labels), task
    assert any("LoRA" in label for label in labels)
    for r in report["requests"]:
        assert r["finite"] and r["samples"] > 0, r["label"]
        assert r["dit_executions"] >= 1, r["label"]
        assert r["estimate"] > 0 and r["measured_peak"] != 0, r["label"]


def test_identical_requests_give_identical_audio(report: dict) -> None:
    assert report["identical"] is True


def test_each_component_loaded_in_a_fresh_process(report: dict) -> None:
    loads = report["load"]
    assert set(loads) == {"text_encoder", "condition_encoder", "dit_decoder", "dcae_encoder", "dcae_decoder",
                          "vocoder"}
    for name, runs in loads.items():
        after = runs["after"]
        assert "error" not in after, (name, after)
        assert after["weights"] > 0 and after["peak_rss"] >= after["steady_rss"] > 0, name


def test_serving_figures_cover_every_process(report: dict) -> None:
    serving = report["serving"]
    assert serving["ready_s"] > 0
    for model in ("tritonserver", "dit_decoder", "condition_encoder", "text2music", "lora_registry"):
        assert model in serving["steady"], model
    assert set(serving["load_s"]) >= {"dit_decoder", "condition_encoder", "vocoder"}
