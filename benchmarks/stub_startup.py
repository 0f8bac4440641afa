"""What each Python-backend stub pays at start-up, this checkout against an older revision.

Every model of a served repository runs in its own stub process, which imports its model body
and loads what it serves before the server is ready; a restarted or reloaded model pays it
again. This measures, in a fresh interpreter per row (nothing imported before, as in a stub):

* ``endpoint``: importing the endpoint model body and loading its serving assets (the prompt
  and lyric tokenizers, the mel front end) with the lyric tokenizer's warm-up, as
  ``TritonPythonModel.initialize`` does;
* each ``torch``-runtime component: importing the runtime and loading the module from the
  checkpoint (``load_component_module``).

Per row: wall seconds (interpreter start included) and CPU seconds of the process, and which
heavy libraries it ended up importing (transformers, diffusers, ``torch._dynamo``). The tiny
random checkpoint is used: the figures are the fixed costs of a stub, which the model's size does
not change. Usage::

    python benchmarks/stub_startup.py [--before REV]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
COMPONENTS = ("text_encoder", "condition_encoder", "dit_decoder", "dcae_encoder", "dcae_decoder", "vocoder")
HEAVY = ("transformers", "diffusers", "torch._dynamo")


def measure(tree: Path, what: str, path: str) -> dict[str, Any]:
    """In the child process: start like a stub of ``what`` with ``tree``'s code."""
    sys.path[:0] = [str(tree / "src"), str(tree / "client")]
    if what == "endpoint":
        importlib.import_module("acestep_triton.serving.orchestrator")
        assets = importlib.import_module("acestep_triton.serving.assets").load_assets(path)
        assets.lyric_tokenizer.warm_up()
    else:
        importlib.import_module("acestep_triton.serving.torch_runtime").load_component_module(what, path)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "imported": [name for name in HEAVY if name in sys.modules]}


def probe(tree: Path, what: str, path: Path) -> dict[str, Any]:
    """One stub's start in a fresh interpreter: its wall seconds (interpreter start included),
    its CPU seconds and its heavy imports."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(tree), what, str(path)], capture_output=True,
                          text=True, check=False, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def rows(trees: dict[str, Path], ckpt: Path, assets: Path) -> list[list[Any]]:
    out = []
    for what in ("endpoint", *COMPONENTS):
        runs = {label: probe(tree, what, assets if what == "endpoint" else ckpt) for label, tree in trees.items()}
        for label, run in runs.items():
            if "error" in run:
                out.append([what, label, run["error"], "", "", ""])
                continue
            base = runs.get("before", {}).get("cpu_s")
            ratio = f"{run['cpu_s'] / base:.2f}" if label == "after" and base else ""
            out.append([what, label, f"{run['wall_s']:.2f}", f"{run['cpu_s']:.2f}", ratio,
                        ", ".join(run["imported"]) or "-"])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=None, help="git revision to measure beside this checkout")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tree, what, path = args.child
        print(json.dumps(measure(Path(tree), what, path)))
        return 0
    # Only here, in the parent: a child must import nothing before it starts like a stub.
    sys.path.insert(0, str(BENCHMARKS))
    from acestep_bench import REPO, format_table
    from full_size import worktree

    from acestep_triton.serving.assets import write_assets
    from acestep_triton.synthetic.tiny_checkpoint import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="stub_startup_") as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", seed=0)
        assets = write_assets(ckpt, Path(tmp) / "assets")
        headers = ["stub", "code", "wall (s)", "CPU (s)", "CPU after ÷ before", "heavy imports"]
        if args.before:
            with worktree(args.before) as old:
                print(format_table(headers, rows({"before": old, "after": REPO}, ckpt, assets)))
        else:
            print(format_table(headers, rows({"after": REPO}, ckpt, assets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
