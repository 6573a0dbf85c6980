"""What a run leaves behind, read back: checkpoints consolidated into Hugging Face weights,
`ftl export`, and models loaded for `ftl generate` / `ftl chat`."""
