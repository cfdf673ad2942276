"""Real backbones from the Hugging Face Hub (registered on import). Filled in by the backbone work."""
