"""Export LLaVA-Rad to deployable artifacts: ONNX bundles (and later TensorRT / TensorRT-LLM)."""
