"""Export stage: torch components to ONNX (+ parity), TensorRT engines, repository rendering."""
