"""Models: tokenizer-independent loading, LoRA, backends, adapters, memory plans, attention kernels."""
