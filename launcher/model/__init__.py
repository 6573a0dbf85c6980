"""The model a run trains: loading it (Hugging Face directory, the embedded SmolLM2, or random),
LoRA/QLoRA adapters, and ftl's attention over packed examples."""
