"""scripts/bench_report.py: every number of the markdown (and of the plots, where matplotlib is installed) is the
JSON's, on a synthetic bench.json shaped like the one scripts/device/bench.sh assembles."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_report.py"
spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
bench_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_report)

CONCURRENCY = [1, 8, 32, 64]
SETS = ["math500", "humaneval", "mtbench", "gsm8k"]
TOK_S = {"ar": [410.3, 2900.7, 8100.2, 12003.9], "builtin": [905.5, 5012.25, 9900.0, 11000.4],
         "ours": [1003.14, 5500.8, 10750.6, None]}  # ours' c64 level ran out of time
TAU = {"ar": None, "builtin": 3.1234, "ours": 3.3456}


def level(prompt_set, c, tok_s, tau, mismatches, ignore_eos, requests=16, errors=0):
    if tok_s is None:
        return {"prompt_set": prompt_set, "concurrency": c, "max_tokens": 256, "ignore_eos": ignore_eos,
                "skipped": "time limit (60s) reached before this level", "requests": 0, "errors": 0,
                "output_tok_s": None, "mean_ttft_ms": None, "mean_tpot_ms": None, "tau": None, "mismatches": None,
                "unchecked": None, "mismatched": [], "per_request": []}
    return {"prompt_set": prompt_set, "concurrency": c, "max_tokens": 256, "ignore_eos": ignore_eos,
            "skipped": None, "requests": requests, "errors": errors, "output_tok_s": tok_s,
            "mean_ttft_ms": 10.0 + c * 0.37, "mean_tpot_ms": 1000 * c / tok_s, "tau": tau,
            "mismatches": mismatches, "unchecked": 0,
            "mismatched": [{"id": f"{prompt_set}-3", "index": 17}] * mismatches, "per_request": []}


def synthetic_bench() -> dict:
    contenders = []
    for name, rates in TOK_S.items():
        sweep = [level("math500", c, rate, TAU[name], 1 if name == "ours" and c == 8 else 0, True, errors=int(c == 32))
                 for c, rate in zip(CONCURRENCY, rates)]
        sets = {s: [level(s, 1, 300.0 + i, None if TAU[name] is None else TAU[name] - i / 7, int(name == "builtin"),
                          False, requests=8)] for i, s in enumerate(SETS)}
        contenders.append({"name": name, "status": "ok", "reason": None,
                           "runs": {"sets": {"limit": 8, "max_tokens": 256, "sets": sets},
                                    "sweep": {"limit": None, "max_tokens": 256, "sets": {"math500": sweep}}}})
    contenders.append({"name": "ours-tree", "status": "skipped", "reason": "no tree flag", "runs": {}})
    return {"date": "2026-12-01", "gpu": "NVIDIA H200", "versions": {"sglang": "0.5.16"}, "reference": "ar",
            "settings": {"target": "/tmp/smol/target", "drafter": "/tmp/smol/drafter", "block_size": 16,
                         "draft_backend": "triton", "dtype": "bfloat16"}, "contenders": contenders}


def table(md: str, header_start: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_throughput_table_is_the_json():
    bench = synthetic_bench()
    rows = table(bench_report.markdown(bench), "| contender | conc |")
    titles = {v: k for k, v in bench_report.TITLES.items()}
    seen = set()
    for cells in rows:
        name, c = titles[cells[0]], int(cells[1])
        seen.add((name, c))
        i = CONCURRENCY.index(c)
        lv = next(c_ for c_ in bench["contenders"] if c_["name"] == name)["runs"]["sweep"]["sets"]["math500"][i]
        if lv["skipped"]:
            assert cells[2] == f"skipped: {lv['skipped']}"
            continue
        assert cells[2] == (f"{lv['requests']}" + (f" ({lv['errors']} failed)" if lv["errors"] else ""))
        assert float(cells[3]) == round(lv["output_tok_s"], 1)
        for col, base in ((4, "ar"), (5, "builtin")):
            ref = TOK_S[base][i]
            assert cells[col] == f"{lv['output_tok_s'] / ref:.2f}x"
        assert float(cells[6]) == round(lv["mean_tpot_ms"], 2) and float(cells[7]) == round(lv["mean_ttft_ms"], 1)
        assert cells[8] == ("-" if lv["tau"] is None else f"{lv['tau']:.2f}")
        checked = lv["requests"] - lv["errors"]
        assert cells[9] == ("reference" if name == "ar" else f"{lv['mismatches']}/{checked}")
    assert seen == {(n, c) for n in TOK_S for c in CONCURRENCY}


def test_set_table_not_run_and_mismatch_details_are_the_json():
    bench = synthetic_bench()
    md = bench_report.markdown(bench)
    rows = {r[0]: r[1:] for r in table(md, "| contender | MATH-500 |")}
    for contender in bench["contenders"][:3]:
        cells = rows[bench_report.TITLES[contender["name"]]]
        levels = [contender["runs"]["sets"]["sets"][s][0] for s in SETS]
        taus = [lv["tau"] for lv in levels]
        assert cells[:4] == ["-" if t is None else f"{t:.2f}" for t in taus]
        assert cells[4] == ("-" if None in taus else f"{sum(taus) / len(taus):.2f}")
        assert cells[5] == ("reference" if contender["name"] == "ar"
                            else f"{sum(lv['mismatches'] for lv in levels)}/{sum(lv['requests'] for lv in levels)}")
    assert "- ours (tree): skipped: no tree flag" in md
    assert "- ours (chain), sweep math500 c=8: math500-3@17" in md
    assert "bench-2026-12-01.json" in md


def test_main_writes_files_and_plots_carry_the_json(tmp_path, monkeypatch):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(synthetic_bench()))
    out = tmp_path / "results"
    assert bench_report.main([str(src), "--out", str(out), "--no-plots"]) == 0
    assert json.loads((out / "bench-2026-12-01.json").read_text()) == synthetic_bench()
    assert (out / "bench-2026-12-01.md").read_text() == bench_report.markdown(synthetic_bench())
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: drawn.append((kw.get("label"), a)) or original(
        self, *a, **kw))
    paths = bench_report.plot(synthetic_bench(), out, "bench-2026-12-01")
    assert all(p.stat().st_size > 0 for p in paths) and len(paths) == 2
    toks, speedup = drawn[:3], drawn[3:]
    for label, (xs, ys) in toks:
        name = {v: k for k, v in bench_report.TITLES.items()}[label]
        expected = [(c, r) for c, r in zip(CONCURRENCY, TOK_S[name]) if r is not None]
        assert list(zip(xs, ys)) == expected
    for label, (xs, ys) in speedup:
        name = {v: k for k, v in bench_report.TITLES.items()}[label]
        points = [(c, r / a) for c, r, a in zip(CONCURRENCY, TOK_S[name], TOK_S["ar"]) if r is not None]
        assert list(xs) == [c for c, _ in points] and list(ys) == pytest.approx([s for _, s in points])


def test_a_set_skipped_for_one_contender_keeps_its_column():
    bench = synthetic_bench()
    ours = bench["contenders"][2]["runs"]["sets"]["sets"]
    ours["gsm8k"] = [level("gsm8k", 1, None, None, 0, False)]
    md = bench_report.markdown(bench)
    header = next(line for line in md.splitlines() if line.startswith("| contender | MATH-500 |"))
    assert "GSM8K" in header
    rows = {r[0]: r[1:] for r in table(md, "| contender | MATH-500 |")}
    assert rows["ours (chain)"][3:5] == ["-", "-"] and rows["builtin DFLASH"][3] != "-"
    assert rows["ours (chain)"][5] == "0/24"
