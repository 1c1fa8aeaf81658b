"""Export: merged Hugging Face weights, GGUF for llama.cpp, the Ollama Modelfile."""
