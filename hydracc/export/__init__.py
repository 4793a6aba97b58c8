"""Export: ONNX graphs of a converted checkpoint (``onnx``), checked with onnxruntime."""
