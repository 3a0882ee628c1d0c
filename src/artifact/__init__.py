"""What ships: the ONNX artifact's making (graph surgery: fp16 conversion, ONNX Runtime fusions, saving past
2 GB), the model cards with their stock one-step calls, a student as a LoRA of its teacher (diffusers and
kohya files), and the single-file checkpoint in the original key layout."""
