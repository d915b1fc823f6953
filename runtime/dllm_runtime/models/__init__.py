"""Native torch diffusion LMs (LLaDA, Dream) loaded from Hugging Face folders, no remote code."""
