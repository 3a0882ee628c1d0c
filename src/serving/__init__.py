"""The ONNX Runtime side: the artifact runtime (no PyTorch), request parsing, the dynamic batcher,
the model-swapping service and the HTTP app with its page, its OpenAI and AUTOMATIC1111 dialects and
API keys."""
