"""`make demo`'s GPU path refuses to run when SGLang could not find our plugin (its builtin would serve)."""

from dflash_sglang import demo


def test_plugin_installed_in_the_test_environment():
    # `make venv` installs this package in editable mode, entry point included.
    assert demo.plugin_installed()


def test_server_demo_refuses_without_the_entry_point(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "entry_points", lambda group: [])
    launched = []
    monkeypatch.setattr(demo.subprocess, "Popen", lambda *a, **k: launched.append(a))
    assert demo.run_server_demo(tmp_path, max_new_tokens=4) == 2
    assert not launched
    out = capsys.readouterr().out
    assert "sglang.srt.plugins" in out and "pip install -e ." in out
