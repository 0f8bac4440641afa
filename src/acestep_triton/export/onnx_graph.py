"""Walking an ONNX graph's tensors (no torch): shared by the exporter and the renderer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def all_tensors(graph: Any) -> Iterator[Any]:
    """Every ``TensorProto`` of a graph that may hold weights: initializers, tensor attributes,
    subgraphs (the exporter puts weights in initializers, but nothing else may be missed)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from all_tensors(sub)
