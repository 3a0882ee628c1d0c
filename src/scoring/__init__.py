"""Scoring generated images: FID (Inception or the embedded evaluator), CLIP score, the attribute
judge per image, bootstrap intervals."""
