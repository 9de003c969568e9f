"""scripts/split_device_site.sh + scripts/device/site.sh: the SGLang site travels as two halves in separate device
commands; the second joins and unpacks it, and every later command serves from it while carrying nothing."""

import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sourced(cwd: Path, box: Path, *parts: str) -> subprocess.CompletedProcess:
    """Source site.sh as a device command would, then show which sglang the environment imports."""
    script = f"source {REPO}/scripts/device/site.sh {' '.join(parts)}; echo \"PYTHONPATH=$PYTHONPATH\""
    env = {**os.environ, "DFLASH_SITE_DIR": str(box), "PYTHONPATH": ""}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_two_halves_unpack_once_both_are_there_and_later_commands_carry_nothing(tmp_path):
    package = tmp_path / "built" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0.0-site-test'\n")
    tarball = tmp_path / "sglang-site.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(package, arcname="sglang")
        tar.add(REPO / "README.md", arcname="padding/README.md")  # enough bytes for two real halves
    payloads = tmp_path / "payloads"
    split = subprocess.run(["bash", str(REPO / "scripts" / "split_device_site.sh"), str(tarball)],
                           env={**os.environ, "SITE_PAYLOAD_ROOT": str(payloads)}, capture_output=True, text=True,
                           timeout=60)
    assert split.returncode == 0, split.stderr
    halves = [payloads / ".device-site1" / "sglang-site.tar.xz.part00",
              payloads / ".device-site2" / "sglang-site.tar.xz.part01"]
    assert halves[0].read_bytes() + halves[1].read_bytes() == tarball.read_bytes()
    assert abs(halves[0].stat().st_size - halves[1].stat().st_size) <= 1

    box = tmp_path / "box"
    first = sourced(payloads, box, ".device-site1")
    assert "still missing the half in .device-site2" in first.stdout and "ready" not in first.stdout
    second = sourced(payloads, box, ".device-site2")
    assert "sglang 0.0-site-test ready" in second.stdout, second.stdout + second.stderr
    assert not list(box.glob("sglang-site.tar.xz.part*"))  # unpacked, the halves are gone
    later = sourced(tmp_path, box)
    assert "sglang 0.0-site-test ready" in later.stdout
    assert f"PYTHONPATH={box}" in later.stdout


def test_a_fresh_machine_is_told_what_to_send(tmp_path):
    result = sourced(tmp_path, tmp_path / "box")
    assert "still missing the half in .device-site1 .device-site2" in result.stdout
