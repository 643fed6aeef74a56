"""slm-course helpers: one small package behind the notebooks, one module per concept (CONTRIBUTING.md has the table).

Import the modules you need, e.g. ``from helpers import env, models``; nothing here runs at import time.
`__all__` lists the modules bottom to top: a module imports only modules listed before it (tests/test_package.py).
"""

__all__ = ["env", "roles", "plots", "compat", "quant", "models", "arch", "lora", "memory", "data", "bench", "evals", "train",
           "launch", "prefs", "rewards", "gguf_file", "export", "llamacpp", "ollama"]
