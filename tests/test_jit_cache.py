"""scripts/device/jit_cache.sh: the JIT caches packed on one box come back in place on the next, without
overwriting what is there, and an archive over the size limit is not packed."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device" / "jit_cache.sh"


def run(verb: str, folder: Path, home: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HOME": str(home), **env}
    environment.pop("TVM_FFI_CACHE_DIR", None)
    return subprocess.run(["bash", str(SCRIPT), verb, str(folder)], env=environment, capture_output=True, text=True,
                          timeout=120)


def fill_caches(home: Path) -> dict[Path, bytes]:
    files = {home / ".triton" / "cache" / "abc" / "kernel.cubin": os.urandom(3000),
             home / ".cache" / "tvm-ffi" / "store_kvcache_sm90" / "store_kvcache.so": b"module"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_packed_caches_are_restored_in_place_and_existing_files_kept(tmp_path):
    home = tmp_path / "home"
    files = fill_caches(home)
    packed = tmp_path / "out" / "jitcache"
    result = run("pack", packed, home)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in packed.iterdir()) == ["jit-cache.tar.xz.part00", "jit-cache.txt"]

    for path in files:
        path.unlink()
    kept = next(iter(files))
    kept.write_bytes(b"newer")  # a file the fresh box already has stays as it is
    result = run("restore", packed, home)
    assert result.returncode == 0, result.stderr
    assert "restored" in result.stdout
    for path, data in files.items():
        assert path.read_bytes() == (b"newer" if path == kept else data)


def test_an_archive_over_the_limit_is_not_packed(tmp_path):
    home = tmp_path / "home"
    big = home / ".triton" / "cache" / "big.bin"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(2 * 1048576))  # incompressible: 2 MiB compressed
    packed = tmp_path / "jitcache"
    result = run("pack", packed, home, MAX_MB="1")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in packed.iterdir()] == ["jit-cache.txt"]
    assert "not packed: over the limit" in (packed / "jit-cache.txt").read_text()


def test_restore_without_parts_and_pack_without_caches_do_nothing(tmp_path):
    result = run("restore", tmp_path / "none", tmp_path / "home")
    assert result.returncode == 0 and "no jit-cache" in result.stdout
    result = run("pack", tmp_path / "jitcache", tmp_path / "home")
    assert result.returncode == 0 and "no cache on this machine" in result.stdout


def test_a_pack_over_its_time_cap_leaves_only_the_note(tmp_path):
    """Packing runs at the end of a command the runner stops at 600 s: past PACK_SECONDS it gives up cleanly."""
    home = tmp_path / "home"
    fill_caches(home)
    packed = tmp_path / "jitcache"
    result = run("pack", packed, home, PACK_SECONDS="0.001")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in packed.iterdir()] == ["jit-cache.txt"]
    assert "took over 0.001s" in (packed / "jit-cache.txt").read_text()
