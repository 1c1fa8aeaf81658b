"""bengali_empathy: QLoRA fine-tuning of Llama-3.1-8B-Instruct for empathetic Bengali replies."""

__version__ = "0.1.0"

__all__ = ["__version__"]
