"""Export toolchain (`sdk.export`, needs `moon3-sdk[export]`): distill, export to ONNX, quantize,
build TensorRT plans and write `moon3.engine`. Heavy dependencies are imported inside functions."""
