"""Synthetic models: random weights in the official layouts, so nothing here needs a download.

* :mod:`.tiny_checkpoint`: the tiny random checkpoint (a few MB, seconds) that tests, exports and
  the demo run on;
* :mod:`.full_size`: the official sizes with random weights (GPU benchmarks, engine builds),
  written as a checkpoint or built directly on a device;
* :mod:`.tiny_lora`: the deterministic tiny LoRA adapter;
* :mod:`.common`: what the two checkpoints share (stand-in tokenizer, init, file writing);
* :mod:`.cli`: ``python -m acestep_triton.synthetic tiny OUT`` / ``full-size OUT``.

Loading any of them is :mod:`acestep_triton.checkpoint`'s job, exactly as for the real files.
"""
