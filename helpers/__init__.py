"""slm-course helpers: one small package behind the notebooks (env, models, quant, lora, data, train, bench, plots).

Import the modules you need, e.g. ``from helpers import env, models``; nothing here runs at import time.
"""

__all__ = ["env", "models", "quant", "arch", "lora", "data", "train", "bench", "evals", "plots"]
