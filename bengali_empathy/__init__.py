"""bengali_empathy: QLoRA fine-tuning of Llama-3.1-8B-Instruct for empathetic Bengali replies."""
import os as _os

# Models load from local paths only: never reach for the Hugging Face hub.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
