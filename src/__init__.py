"""SwiftBrush pipeline: image-free one-step distillation of Stable-Diffusion-style teachers."""
