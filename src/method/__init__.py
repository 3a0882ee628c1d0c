"""The method: SwiftBrush's variational score distillation, the one-step student, the teacher
loader, LoRA adapter tools, the CLIP loss and the seed -> noise convention."""
