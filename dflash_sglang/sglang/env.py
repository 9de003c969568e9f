"""How our switches read from the environment: SGLang's scheduler processes get our launch flags only as
environment variables (flags.py)."""

from __future__ import annotations

import os

TRUE_VALUES = ("1", "true", "yes", "on")


def env_flag(name: str, environ=os.environ) -> bool:
    """Whether the environment variable `name` is set to a true value (1, true, yes, on; any case)."""
    return environ.get(name, "").strip().lower() in TRUE_VALUES
