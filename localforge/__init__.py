"""localforge: build small, specialised LLMs on your own hardware.

The top-level package stays import-light: heavy stacks (torch, mlx, transformers,
llama.cpp) are imported only by the backend that uses them.
"""

__version__ = "0.1.0"
