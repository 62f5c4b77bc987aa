"""splitllm-export: turn a Hugging Face checkpoint, a GGUF file or the built-in model into a bundle."""
