"""`localforge export`: a fine-tuning run, an adapter or a model folder as a merged HF folder, a
GGUF file or an Ollama folder (GGUF + Modelfile). ``plan`` checks, ``export`` writes (see job.py);
``modelfile`` turns the model's chat template into Ollama's. Imports no engine."""

from localforge.export.job import Plan, Result, Source, export, find_source, plan

__all__ = ["Plan", "Result", "Source", "export", "find_source", "plan"]
