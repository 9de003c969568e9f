"""The device test-harness plugins (scripts/device/*_plugin.py) against the real sglang 0.5.16 package."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "device"))
import triton_swa_window_plugin as swa  # noqa: E402


class Backend:
    def __init__(self, window):
        self.sliding_window_size = window


class WrappedBackend(Backend):
    """A subclass whose __init__ goes through the hooked one again (super()), as the hook may see."""


def construct(cls, window):
    backend = cls.__new__(cls)
    swa.widen_decode_window(lambda b, w: Backend.__init__(b, w), backend, window)
    return backend


@pytest.mark.parametrize("window, widened", [(7, 8), (1023, 1024), (None, None), (-1, -1), (0, 0)])
def test_decode_window_gets_the_key_sglang_drops(window, widened):
    assert construct(Backend, window).sliding_window_size == widened


def test_a_backend_is_widened_once():
    backend = construct(WrappedBackend, 7)
    swa.widen_decode_window(lambda b: None, backend)  # the hooked __init__ seen a second time
    assert backend.sliding_window_size == 8


@pytest.mark.parametrize("env, registered", [("1", True), ("", False)])
def test_registered_only_when_asked(monkeypatch, env, registered):
    from sglang.srt.plugins.hook_registry import HookRegistry

    calls = []
    monkeypatch.setattr(HookRegistry, "register", lambda *a: calls.append(a))
    monkeypatch.setenv("DFLASH_E2E_TRITON_SWA_FIX", env)
    swa.register()
    assert [c[:2] for c in calls] == ([(swa.TARGET, swa.widen_decode_window)] if registered else [])


def test_target_is_sglangs_triton_backend_init():
    module, cls, attr = swa.TARGET.rsplit(".", 2)
    backend = getattr(importlib.import_module(module), cls)
    assert "sliding_window_size" in backend.__init__.__code__.co_names
    assert attr == "__init__"
