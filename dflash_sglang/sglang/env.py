"""How our switches read from the environment: SGLang's scheduler processes get our launch flags only as
environment variables (flags.py)."""

from __future__ import annotations

import os

from dflash_sglang.config import DFlashConfigError

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")


def env_flag(name: str, environ=os.environ) -> bool:
    """Whether the environment variable `name` is set to a true value (1, true, yes, on; any case)."""
    return environ.get(name, "").strip().lower() in TRUE_VALUES


def env_switch(name: str, environ=os.environ) -> bool | None:
    """A three-way switch: True or False when `name` says so (as env_flag reads it), None when unset or empty (the
    switch's automatic choice)."""
    value = environ.get(name, "").strip().lower()
    if not value:
        return None
    if value not in TRUE_VALUES + FALSE_VALUES:
        raise DFlashConfigError([f"{name}={environ[name]!r}: set it to one of {', '.join(TRUE_VALUES + FALSE_VALUES)}, "
                                 f"or unset it"])
    return value in TRUE_VALUES
