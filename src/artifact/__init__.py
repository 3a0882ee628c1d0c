"""The ONNX artifact's making: graph surgery (fp16 conversion, ONNX Runtime fusions, saving past
2 GB) and the model card."""
