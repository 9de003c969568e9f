"""scripts/device/host_sampler_plugin.py + host_profile.py: a server's host time per output token, by function.

A fake server (plain HTTP, requests handled on its main thread like SGLang's scheduler loop) spends a known time
per token in one function and a known time per request in another; the profile must find both at those rates."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICE = REPO / "scripts" / "device"
TOKEN_MS, REQUEST_MS = 1.0, 12.0  # what a token and a request spin

FAKE_WORK = """
import time

def spin(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass

def decode_token(nested=False):
    spin({token_s})
    if nested:
        decode_token()  # a call inside a call of the same timed function: counted once, with the outer one

def admit_request():
    spin({request_s})

class Scheduler:
    def run(self, tokens):
        admit_request()
        for i in range(tokens):
            decode_token(nested=i == 0)
""".format(token_s=TOKEN_MS / 1000, request_s=REQUEST_MS / 1000)

FAKE_SERVER = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
import host_sampler_plugin
host_sampler_plugin.WRITE_EVERY_S = 0.3
host_sampler_plugin.register()
import fake_work

class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tokens = body["sampling_params"]["max_new_tokens"]
        fake_work.Scheduler().run(tokens)
        out = json.dumps({"text": "", "meta_info": {"completion_tokens": tokens}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""
TIMED = "fake_work:decode_token,fake_work:admit_request,fake_work:Scheduler.run,fake_work:missing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"fake server on {port} did not start")


def test_profile_finds_the_time_each_function_takes_per_token(tmp_path):
    port, samples, out = free_port(), tmp_path / "samples", tmp_path / "fake.json"
    server_py = tmp_path / "fake_server.py"
    server_py.write_text(FAKE_SERVER)
    (tmp_path / "fake_work.py").write_text(FAKE_WORK)
    env = {**os.environ, "PYTHONPATH": f"{DEVICE}:{tmp_path}", "DFLASH_HOST_SAMPLES": str(samples),
           "DFLASH_HOST_SAMPLE_MS": "1", "DFLASH_HOST_TIMED": TIMED}
    server = subprocess.Popen([sys.executable, str(server_py), str(port)], env=env)
    try:
        wait_for_port(port)
        max_tokens, rounds = 60, 3
        run = subprocess.run([sys.executable, str(DEVICE / "host_profile.py"), "--port", str(port), "--samples",
                              str(samples), "--out", str(out), "--label", "fake", "--concurrency", "1", "2",
                              "--rounds", str(rounds), "--max-tokens", str(max_tokens)],
                             capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["tokens"] == level["concurrency"] * rounds * max_tokens
        inclusive = level["inclusive_us_per_token"]
        token_us = inclusive["fake_work.py:decode_token"]
        request_us = inclusive["fake_work.py:admit_request"]
        # Sampling at 1 ms over ~0.2-0.5 s of spinning: well within 35% of the true rates.
        assert abs(token_us - TOKEN_MS * 1000) < 0.35 * TOKEN_MS * 1000, level
        assert abs(request_us - REQUEST_MS * 1000 / max_tokens) < 0.35 * REQUEST_MS * 1000 / max_tokens, level
        assert inclusive["fake_server.py:do_POST"] >= token_us + request_us * 0.9
        assert level["self_us_per_token"]["fake_work.py:spin"] > 0.9 * (token_us + request_us)
        # The timers: exact calls, and per-call times of what each call spins (nested calls counted once).
        requests = level["concurrency"] * rounds
        timed = level["timed"]
        assert set(timed) == {"fake_work:decode_token", "fake_work:admit_request", "fake_work:Scheduler.run"}
        assert timed["fake_work:decode_token"]["calls"] == level["tokens"]
        assert timed["fake_work:admit_request"]["calls"] == timed["fake_work:Scheduler.run"]["calls"] == requests
        assert abs(timed["fake_work:admit_request"]["us_per_call"] - REQUEST_MS * 1000) < 0.1 * REQUEST_MS * 1000
        expected_token_us = TOKEN_MS * 1000 * (max_tokens + 1) / max_tokens
        assert abs(timed["fake_work:decode_token"]["us_per_token"] - expected_token_us) < 0.1 * expected_token_us
        parts_us = timed["fake_work:decode_token"]["us_per_token"] + timed["fake_work:admit_request"]["us_per_token"]
        assert timed["fake_work:Scheduler.run"]["us_per_token"] >= parts_us
        assert level["gpu_wait_us_per_token"] == 0
        # Requests run back to back on the server's one thread: busy nearly all the time they are in flight,
        # and the snapshot waits around them (select in serve_forever) do not count as busy.
        assert 0.8 < level["busy_share"] <= 1.05, level
        assert level["main_seconds"] > level["seconds"]
    table = run.stdout
    assert "fake_work.py:decode_token" in table and "fake_work:Scheduler.run" in table
    assert table.splitlines()[0].startswith("server")
    again = subprocess.run([sys.executable, str(DEVICE / "host_profile.py"), "--report", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout == table


FAKE_PYTHON = """#!/bin/bash
# Stands in for python3 in host_profile.sh: records each server's command line; servers die at once.
case "$*" in
  *launch_server*) echo "$*" >> "{launches}"; exit 1 ;;
  *"print(load_drafter_config"*) echo 16 ;;
esac
"""


def launched_servers(tmp_path: Path, *args: str, script: str = "host_profile.sh") -> list[str]:
    """The server command lines `script` launches (the servers die at once, so nothing is measured)."""
    smol, bin_dir, launches = tmp_path / "smol", tmp_path / "bin", tmp_path / "launches.txt"
    for folder in ("target", "drafter"):
        (smol / folder).mkdir(parents=True)
        (smol / folder / "config.json").write_text("{}")
    (smol / "drafter" / "model.safetensors").write_bytes(b"")
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON.format(launches=launches))
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SMOL_DIR": str(smol), "OUT": str(tmp_path)}
    subprocess.run(["bash", str(DEVICE / script), *args], env=env, capture_output=True, timeout=120)
    return launches.read_text().splitlines()


def by_port(lines: list[str]) -> dict[str, str]:
    return {line.split("--port ")[1].split()[0]: line for line in lines}


def test_profiled_servers_can_take_the_benchmarks_prefill_settings(tmp_path):
    """--prefill-graphs keeps SGLang's prefill graphs, --spec-server-args reaches the four speculative servers and
    not AR (port 30400), as bench.sh gives them; without them prefills run eagerly, as in the earlier profiles."""
    delayer = "--enable-prefill-delayer --prefill-delayer-max-delay-passes 20"
    servers = by_port(launched_servers(tmp_path / "bench", "--prefill-graphs", "--spec-server-args", delayer))
    assert len(servers) == 5 and not any("--disable-prefill-cuda-graph" in line for line in servers.values())
    assert delayer not in servers["30400"]
    assert all(delayer in line for port, line in servers.items() if port != "30400")
    default = by_port(launched_servers(tmp_path / "default"))
    assert all("--disable-prefill-cuda-graph" in line and "prefill-delayer" not in line for line in default.values())
    # The largest level runs whole on every server (SGLang caps speculative ones at 48 running requests).
    assert all("--max-running-requests 64 " in line for line in [*servers.values(), *default.values()])


def test_profile_can_run_a_subset_of_servers_with_flags_for_all(tmp_path):
    """--servers starts only those named (AR 30400, ours 30402); --server-args reaches each of them, AR included;
    a name that is not a server is refused before anything starts."""
    backend = "--cuda-graph-backend-prefill full"
    servers = by_port(launched_servers(tmp_path / "subset", "--servers", "ar ours", "--server-args", backend))
    assert sorted(servers) == ["30400", "30402"]
    assert all(backend in line for line in servers.values())
    assert "--speculative-algorithm DFLASH" in servers["30402"] and "--speculative" not in servers["30400"]
    bad = subprocess.run(["bash", str(DEVICE / "host_profile.sh"), "--servers", "ar chain"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert bad.returncode == 2 and "no server named chain" in bad.stderr


def test_scheduler_variants_profiles_each_setting_with_prefill_graphs_on(tmp_path):
    """scripts/device/scheduler_variants.sh: one host_profile.sh run per variant, its first arguments on every
    server, its second on the speculative ones only, prefill graphs never disabled; a bad name is refused first."""
    lines = launched_servers(tmp_path / "ok", "--servers", "ar ours", "--variant", "base||",
                             "--variant", "recv16|--scheduler-recv-interval 16|--enable-prefill-delayer",
                             script="scheduler_variants.sh")
    assert len(lines) == 4 and not any("--disable-prefill-cuda-graph" in line for line in lines)
    recv = by_port(line for line in lines if "--scheduler-recv-interval 16" in line)
    assert sorted(recv) == ["30400", "30402"]
    assert "--enable-prefill-delayer" in recv["30402"] and "--enable-prefill-delayer" not in recv["30400"]
    assert not any("--enable-prefill-delayer" in line for line in lines if line not in recv.values())
    bad = subprocess.run(["bash", str(DEVICE / "scheduler_variants.sh"), "--variant", "a b|x|"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    assert bad.returncode == 2 and "NAME must be" in bad.stderr
