"""Infrastructure every layer uses: errors, atomic files, checkpoints, manifests, configuration,
process launch, prompt text and prompt files, images. Imports nothing else from src."""
