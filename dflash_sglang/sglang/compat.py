"""The one SGLang release this glue is written against, and the check that refuses any other.

The worker relies on SGLang internals that change between releases (the spec-v2 worker contract, the DFLASH
data carriers, ForwardBatch fields), so a different release is refused up front rather than failing mid-step.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import InvalidVersion, Version

SUPPORTED_SGLANG_VERSION = "0.5.16"


class UnsupportedSGLangVersion(RuntimeError):
    pass


def installed_sglang_version() -> str:
    try:
        return version("sglang")
    except PackageNotFoundError:
        import sglang  # an unpacked site without dist-info metadata still carries the version string

        return sglang.__version__


def check_sglang_version(found: str | None = None) -> None:
    """Raise UnsupportedSGLangVersion unless SGLang is exactly 0.5.16 (local build tags like +cu130 are fine)."""
    found = installed_sglang_version() if found is None else found
    try:
        supported = Version(found).public == SUPPORTED_SGLANG_VERSION
    except InvalidVersion:
        supported = False
    if not supported:
        raise UnsupportedSGLangVersion(
            f"dflash_sglang supports sglang=={SUPPORTED_SGLANG_VERSION} only, found sglang {found}; its DFLASH "
            f"worker is not registered and SGLang's builtin DFLASH serves instead. Install "
            f"sglang=={SUPPORTED_SGLANG_VERSION} to use dflash_sglang, or uninstall dflash-sglang to silence this."
        )
