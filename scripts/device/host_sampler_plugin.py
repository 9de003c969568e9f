"""Test-harness SGLang plugin: where each server process spends its host time, by Python stack (not the product).

With DFLASH_HOST_SAMPLES=DIR, every process that loads SGLang's plugins (the scheduler included) starts a daemon
thread that samples every other thread's Python stack each DFLASH_HOST_SAMPLE_MS milliseconds (default 2) and
keeps the seconds per folded stack ("thread;file:function;..."). Every 2 s it rewrites DIR/host-<pid>.json with
the cumulative figures, so a driver can take snapshots around a window of load and subtract them
(scripts/device/host_profile.py). Torch's profiler attributes time to operators and CUDA calls; what a 135M
target's server is bound by at 32 requests is Python (the scheduler's per-request work and our step's), which only
a stack sampler sees. The sampler takes the GIL for a few tens of microseconds per sample (~2% at 2 ms).

A Python sampler runs only when it gets the GIL: from a thread in pure Python, after the interpreter's switch
interval (5 ms by default), from one in a C call that releases the GIL (most torch ops), at once. Each sample is
weighted by the time since the last one, so a busy stretch is not undercounted, but that time goes to the frame the
sampler caught, which favours GIL-releasing calls. The plugin lowers the switch interval to a quarter of the
sampling interval so that the catch happens within ~0.5 ms of the wake-up wherever the thread is.

Exact figures for chosen functions: DFLASH_HOST_TIMED="module:Class.method,module:function,..." wraps each with a
timer (calls, and host seconds from entry to return; a call nested in a call of the same function is not counted
twice), written to the same file under "timed". Those are what a function costs, not what a sample happened to
catch; the samples say where to look.
"""

import functools
import importlib
import json
import logging
import os
import sys
import threading
import time

WRITE_EVERY_S = 2.0
logger = logging.getLogger(__name__)
# entry ("module:qualname") -> [calls, seconds]; filled by the timed wrappers, read by the sampler thread.
TIMED: dict[str, list] = {}


def register() -> None:
    folder = os.environ.get("DFLASH_HOST_SAMPLES")
    if not folder:
        return
    for entry in filter(None, (e.strip() for e in os.environ.get("DFLASH_HOST_TIMED", "").split(","))):
        time_calls(entry)
    interval = float(os.environ.get("DFLASH_HOST_SAMPLE_MS", "2")) / 1000
    sys.setswitchinterval(min(sys.getswitchinterval(), interval / 4))
    threading.Thread(target=sample_forever, args=(folder, interval), name="dflash-host-sampler", daemon=True).start()


def time_calls(entry: str) -> None:
    """Replace `module:qualname` with a wrapper that adds up its calls and host seconds in TIMED[entry]."""
    module_name, _, qualname = entry.partition(":")
    try:
        owner = importlib.import_module(module_name)
        *path, name = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    except (ImportError, AttributeError, KeyError) as e:
        logger.warning("host sampler: cannot time %s (%s)", entry, e)
        return
    totals = TIMED.setdefault(entry, [0, 0.0])
    depth = threading.local()

    @functools.wraps(original)
    def timed(*args, **kwargs):
        if getattr(depth, "n", 0):
            return original(*args, **kwargs)
        depth.n = 1
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[0] += 1
            totals[1] += time.perf_counter() - start
            depth.n = 0

    setattr(owner, name, timed)


def folded_stack(frame, thread_name: str) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
        frame = frame.f_back
    names.append(thread_name)
    return ";".join(reversed(names))


def sample_forever(folder: str, interval: float) -> None:
    os.makedirs(folder, exist_ok=True)
    me = threading.get_ident()
    seconds: dict[str, float] = {}
    samples = 0
    last = time.monotonic()
    next_write = last + WRITE_EVERY_S
    while True:
        time.sleep(interval)
        # Each sample stands for the time since the last one: a thread that holds the GIL delays the sampler's
        # wake-up by up to the switch interval (5 ms), so a plain count would undercount exactly the busy stacks.
        now = time.monotonic()
        elapsed, last = now - last, now
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident != me:
                stack = folded_stack(frame, names.get(ident, str(ident)))
                seconds[stack] = seconds.get(stack, 0.0) + elapsed
        samples += 1
        if now >= next_write:
            next_write = now + WRITE_EVERY_S
            write(folder, seconds, samples)


def write(folder: str, seconds: dict[str, float], samples: int) -> None:
    try:
        with open("/proc/self/comm") as f:
            name = f.read().strip()
    except OSError:
        name = ""
    path = os.path.join(folder, f"host-{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "process": name, "samples": samples, "time": time.time(),
                   "seconds": seconds, "timed": {entry: list(totals) for entry, totals in TIMED.items()}}, f)
    os.replace(path + ".tmp", path)
