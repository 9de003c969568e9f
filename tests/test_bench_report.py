"""scripts/bench_report.py: every number of the markdown (and of the plots, where matplotlib is installed) is the
JSON's, on a synthetic bench.json shaped like the one scripts/device/bench.sh assembles."""

import importlib.util
import json
import statistics
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
NEAR_TIE = 0.05
# AR's top-2 margins at the mismatches: ours' one sweep mismatch is a near-tie, builtin's per-set ones are not (the
# GSM8K one is past AR's output); the MT-Bench level was checked against an AR run without margins.
MARGINS = {"ours": 0.03125, "builtin": {"math500": 0.0625, "humaneval": 1.5, "mtbench": None, "gsm8k": float("inf")}}


def level(prompt_set, c, tok_s, tau, mismatches, ignore_eos, requests=16, errors=0, margin=None):
    if tok_s is None:
        return {"prompt_set": prompt_set, "concurrency": c, "max_tokens": 256, "ignore_eos": ignore_eos,
                "skipped": "time limit (60s) reached before this level", "requests": 0, "errors": 0,
                "output_tok_s": None, "mean_ttft_ms": None, "mean_tpot_ms": None, "tau": None, "mismatches": None,
                "unchecked": None, "mismatch_max_margin": None, "mismatches_above_tolerance": None,
                "mismatched": [], "per_request": []}
    return {"prompt_set": prompt_set, "concurrency": c, "max_tokens": 256, "ignore_eos": ignore_eos,
            "skipped": None, "requests": requests, "errors": errors, "output_tok_s": tok_s,
            "mean_ttft_ms": 10.0 + c * 0.37, "mean_tpot_ms": 1000 * c / tok_s, "tau": tau,
            "mismatches": mismatches, "unchecked": 0, "mismatch_max_margin": margin if mismatches else None,
            "mismatches_above_tolerance": None if margin is None else mismatches * (margin >= NEAR_TIE),
            "mismatched": [{"id": f"{prompt_set}-3", "index": 17, "margin": margin}] * mismatches, "per_request": []}


def synthetic_bench() -> dict:
    contenders = []
    for name, rates in TOK_S.items():
        sweep = [level("math500", c, rate, TAU[name], 1 if name == "ours" and c == 8 else 0, True, errors=int(c == 32),
                       margin=MARGINS["ours"] if name == "ours" else 0.5) for c, rate in zip(CONCURRENCY, rates)]
        sets = {s: [level(s, 1, 300.0 + i, None if TAU[name] is None else TAU[name] - i / 7, int(name == "builtin"),
                          False, requests=8, margin=MARGINS["builtin"][s] if name == "builtin" else 0.5)]
                for i, s in enumerate(SETS)}
        contenders.append({"name": name, "status": "ok", "reason": None,
                           "runs": {"sets": {"limit": 8, "max_tokens": 256, "sets": sets},
                                    "sweep": {"limit": None, "max_tokens": 256, "sets": {"math500": sweep}}}})
    contenders.append({"name": "ours-tree", "status": "skipped", "reason": "no tree flag", "runs": {}})
    return {"date": "2026-12-01", "gpu": "NVIDIA H200", "versions": {"sglang": "0.5.16"}, "reference": "ar",
            "near_tie_tolerance": NEAR_TIE,
            "settings": {"target": "/tmp/smol/target", "drafter": "/tmp/smol/drafter", "block_size": 16,
                         "draft_backend": "triton", "dtype": "bfloat16"}, "contenders": contenders}


def margin_cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


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
        assert cells[10:] == (["reference"] * 2 if name == "ar" else
                              [margin_cell(lv["mismatch_max_margin"]), f"{lv['mismatches_above_tolerance']}"])
    assert seen == {(n, c) for n in TOK_S for c in CONCURRENCY}
    ours_c8 = next(r for r in rows if r[:2] == ["ours (chain)", "8"])
    assert ours_c8[9:] == ["1/16", "0.0312", "0"]  # one mismatch, a near-tie


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
        margins = [lv["mismatch_max_margin"] for lv in levels if lv["mismatch_max_margin"] is not None]
        above = [lv["mismatches_above_tolerance"] for lv in levels if lv["mismatches_above_tolerance"] is not None]
        assert cells[6:] == (["reference"] * 2 if contender["name"] == "ar" else
                             [margin_cell(max(margins, default=None)), "-" if not above else f"{sum(above)}"])
    assert rows["builtin DFLASH"][6:] == ["inf", "3"] and rows["ours (chain)"][6:] == ["-", "0"]
    assert "- ours (tree): skipped: no tree flag" in md
    assert "- ours (chain), sweep math500 c=8: math500-3@17 (0.0312)" in md
    for contender in bench["contenders"]:
        for stage, run in contender["runs"].items():
            for lv in (lv for lvs in run["sets"].values() for lv in lvs if lv["mismatched"]):
                where = ", ".join(f"{m['id']}@{m['index']}" + ("" if m["margin"] is None else f" ({m['margin']:.4f})")
                                  for m in lv["mismatched"])
                line = (f"- {bench_report.TITLES[contender['name']]}, {stage} {lv['prompt_set']} "
                        f"c={lv['concurrency']}: {where}")
                assert line in md.splitlines()
    assert "- builtin DFLASH, sets mtbench c=1: mtbench-3@17" in md.splitlines()  # no margins: no parentheses
    assert f"not below {NEAR_TIE:g}" in md
    assert "Raw figures: [bench-2026-12-01.json.xz](bench-2026-12-01.json.xz)" in md


def recorded_plot_lines(monkeypatch) -> list:
    """Every line the report's plots draw, as (label, (xs, ys)), in drawing order (skips without matplotlib)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    drawn = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: drawn.append((kw.get("label"), a)) or original(
        self, *a, **kw))
    return drawn


def test_main_writes_files_and_plots_carry_the_json(tmp_path, monkeypatch):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(synthetic_bench()))
    out = tmp_path / "results"
    assert bench_report.main([str(src), "--out", str(out), "--no-plots"]) == 0
    assert bench_report.load_bench(out / "bench-2026-12-01.json.xz") == synthetic_bench()
    assert (out / "bench-2026-12-01.md").read_text() == bench_report.markdown(synthetic_bench())
    # The committed copy reads back as the report's input: the same report again.
    assert bench_report.main([str(out / "bench-2026-12-01.json.xz"), "--out", str(out), "--no-plots"]) == 0
    assert (out / "bench-2026-12-01.md").read_text() == bench_report.markdown(synthetic_bench())
    drawn = recorded_plot_lines(monkeypatch)
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
    assert rows["ours (chain)"][5:] == ["0/24", "-", "0"]


BUDGETS = {"ours-tree-8": 8, "ours-tree-16": 16, "ours-tree-32": 32, "ours-tree-64": 64}
TREE_C1 = {"ours-tree-8": 1100.25, "ours-tree-16": 1203.5, "ours-tree-32": None, "ours-tree-64": 950.75}
TREE_TAU = {"ours-tree-8": 3.61, "ours-tree-16": 3.95, "ours-tree-32": 4.4, "ours-tree-64": 4.62}
PROFILE_SUMMARY = {"steps": 41, "host_ms_per_step_mean": 1.23456, "host_ms_per_step_median": 1.2,
                   "copies_per_step": 3.0, "kernel_launches_per_step": 12.25, "graph_launches_per_step": 2.0,
                   "host_syncs_per_step": 0.0, "host_syncs": {}, "top_ops_by_host_time": [], "concurrency": 1}


KERNELS = [{"kernel": f"kernel_{i}", "launches_per_step": 12.0 - i} for i in range(12)]


def sweep_bench() -> dict:
    """synthetic_bench with a tree budget sweep (bench.sh --tree-budget "8 16 32 64"): every tree contender ran the
    sets stage and the sweep's c1 level only (ours-tree-32's c1 ran out of time), plus the profile stage."""
    bench = synthetic_bench()
    bench["contenders"] = [c for c in bench["contenders"] if c["name"] != "ours-tree"]
    for name, rate in TREE_C1.items():
        sets = {s: [level(s, 1, 280.0 + i, TREE_TAU[name] - i / 9, 0, False, requests=8, margin=0.5)]
                for i, s in enumerate(SETS)}
        sweep = [level("math500", 1, rate, TREE_TAU[name] + 0.1, 0, True, margin=0.5)]
        bench["contenders"].append({"name": name, "status": "ok", "reason": None,
                                    "runs": {"sets": {"limit": 8, "max_tokens": 256, "sets": sets},
                                             "sweep": {"limit": None, "max_tokens": 256, "sets": {"math500": sweep}}}})
    bench["settings"].update(tree_contenders=BUDGETS, tree_topk="plugin default")
    bench["profiles"] = [
        {"contender": "builtin", "concurrency": 1, "status": "ok", "reason": None,
         "summary": {**PROFILE_SUMMARY, "steps": 0, "scheduler_step": {**PROFILE_SUMMARY, "steps": 40}}},
        {"contender": "ours", "concurrency": 1, "status": "ok", "reason": None,
         "summary": {**PROFILE_SUMMARY, "scheduler_step": {**PROFILE_SUMMARY, "host_ms_per_step_mean": 3.5,
                                                           "top_kernels_by_launches": KERNELS}}},
        {"contender": "ours", "concurrency": 32, "status": "ok", "reason": None,
         "summary": {**PROFILE_SUMMARY, "steps": 40, "host_ms_per_step_mean": 2.5, "host_syncs_per_step": 0.125}},
        {"contender": "ours-tree-16", "concurrency": 1, "status": "failed", "reason": "not done within 60s",
         "summary": None}]
    return bench


def test_tree_budget_sweep_table_is_the_json():
    bench = sweep_bench()
    md = bench_report.markdown(bench)
    rows = table(md, "| N | MATH-500 |")
    assert [r[0] for r in rows] == ["8", "16", "32", "64", "chain"]
    by_name = {c["name"]: c for c in bench["contenders"]}
    ours_c1 = by_name["ours"]["runs"]["sweep"]["sets"]["math500"][0]["output_tok_s"]
    ar_c1 = by_name["ar"]["runs"]["sweep"]["sets"]["math500"][0]["output_tok_s"]
    for cells, name in zip(rows, [*BUDGETS, "ours"]):
        taus = [by_name[name]["runs"]["sets"]["sets"][s][0]["tau"] for s in SETS]
        assert cells[1:5] == [f"{t:.2f}" for t in taus]
        assert cells[5] == f"{sum(taus) / len(taus):.2f}"
        c1 = by_name[name]["runs"]["sweep"]["sets"]["math500"][0]["output_tok_s"]
        assert cells[6:] == (["-"] * 3 if c1 is None else
                             [f"{c1:.1f}", f"{c1 / ours_c1:.2f}x", f"{c1 / ar_c1:.2f}x"])
    assert rows[-1][7] == "1.00x" and rows[2][6:] == ["-", "-", "-"]
    assert "| ours (tree, 16 nodes) | 1 |" in md  # the tree contenders in the throughput table, by node count
    assert "tree-budget.png" in md


def test_single_tree_budget_has_no_sweep_table():
    bench = synthetic_bench()
    bench["settings"]["tree_contenders"] = {"ours-tree": 32}
    assert bench_report.tree_sweep_rows(bench) == []
    md = bench_report.markdown(bench)
    assert "Tree budget sweep" not in md and "tree-budget.png" not in md and "Per-step host cost" not in md


def test_tree_budget_sweep_where_no_tree_ran_has_no_table():
    bench = sweep_bench()
    for contender in bench["contenders"]:
        if contender["name"] in BUDGETS:
            contender.update(status="skipped", reason="no tree flag", runs={})
    assert bench_report.tree_sweep_rows(bench) == []
    md = bench_report.markdown(bench)
    assert "Tree budget sweep" not in md and "- ours (tree, 64 nodes): skipped: no tree flag" in md


def test_profile_table_is_the_json():
    bench = sweep_bench()
    rows = table(bench_report.markdown(bench), "| contender | conc | range |")
    expected = []  # (run, range key) in table order: each run's scheduler step, then its decode step if it has one
    for run in bench["profiles"]:
        summary = run["summary"] or {}
        keys = [key for key in ("scheduler_step", None) if ((summary.get(key) if key else summary) or {}).get("steps")]
        expected += [(run, key) for key in keys] or [(run, "none")]
    assert len(rows) == len(expected) == 5
    for cells, (run, key) in zip(rows, expected):
        assert cells[:2] == [bench_report.title(bench, run["contender"]), str(run["concurrency"])]
        if run["status"] != "ok":
            assert cells[2] == f"{run['status']}: {run['reason']}" and set(cells[3:]) == {""}
            continue
        figures = run["summary"][key] if key else run["summary"]
        assert cells[2] == ("scheduler step" if key else "our decode step")
        assert int(cells[3]) == figures["steps"]
        assert cells[4:] == [f"{figures['host_ms_per_step_mean']:.3f}", f"{figures['host_ms_per_step_median']:.3f}",
                             f"{figures['kernel_launches_per_step']:.1f}", f"{figures['graph_launches_per_step']:.1f}",
                             f"{figures['host_syncs_per_step']:.2f}"]
    assert [r[:3] for r in rows[:3]] == [["builtin DFLASH", "1", "scheduler step"],
                                         ["ours (chain)", "1", "scheduler step"], ["ours (chain)", "1", "our decode step"]]
    assert rows[1][4] == "3.500" and rows[3][2] == "our decode step"  # an old summary: the decode range only
    assert rows[4][:3] == ["ours (tree, 16 nodes)", "1", "failed: not done within 60s"]


def test_tree_budget_plot_carries_the_json(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    drawn, lines = [], []
    original_plot, original_axhline = Axes.plot, Axes.axhline
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: drawn.append((kw.get("label"), a)) or original_plot(
        self, *a, **kw))
    monkeypatch.setattr(Axes, "axhline", lambda self, y, **kw: lines.append((kw.get("label"), y)) or original_axhline(
        self, y, **kw))
    paths = bench_report.plot(sweep_bench(), tmp_path, "bench-2026-12-01")
    assert [p.name for p in paths][-1] == "bench-2026-12-01-tree-budget.png" and paths[-1].stat().st_size > 0
    tau, toks = drawn[-2:]
    rows = {r["contender"]: r for r in bench_report.set_rows(sweep_bench())}
    assert tau[0] == "ours (tree)" and list(zip(*tau[1])) == [(BUDGETS[n], rows[n]["mean_tau"]) for n in BUDGETS]
    assert list(zip(*toks[1])) == [(BUDGETS[n], r) for n, r in TREE_C1.items() if r is not None]
    assert lines[-3:] == [("chain", rows["ours"]["mean_tau"]), ("chain", TOK_S["ours"][0]), ("AR", TOK_S["ar"][0])]


def test_kernels_per_step_list_is_the_json():
    md = bench_report.markdown(sweep_bench())
    lines = [line for line in md.splitlines() if line.startswith("- ours (chain), c1: ")]
    assert lines == ["- ours (chain), c1: " + ", ".join(f"`kernel_{i}` x{12.0 - i:.1f}" for i in range(10))]
    assert "- builtin DFLASH, c1:" not in md  # its summary lists no kernels (an older profile_step)


INTERLEAVED_TOK_S = {"ar": [400.0, 360.0, 390.0], "builtin": [900.0, 700.0, 880.0], "ours": [990.0, 721.0, 1000.0],
                     "ours-tree": [1300.0, 950.0, None]}  # the tree's third repeat failed every request


def interleaved_bench() -> dict:
    """synthetic_bench with bench.sh's interleaved stage: c1 with the tree, three repeats; c8 with one repeat
    counted, its second cut by the time limit (dropped) and no third; c64 skipped."""
    bench = synthetic_bench()
    names = ["ar", "builtin", "ours", "ours-tree"]

    def entry(name, table):
        rates = table[name]

        def vs(base):
            ratios = [a / b if a is not None else None for a, b in zip(rates, table[base])]
            known = [r for r in ratios if r is not None]
            return {"ratios": ratios, "median": statistics.median(known), "min": min(known), "max": max(known)}

        median = statistics.median(r for r in rates if r is not None)
        return {"tok_s": rates, "median_tok_s": median, "tpot_ms": [], "median_tpot_ms": 1000 / median,
                "ttft_ms": [], "median_ttft_ms": 12.5, "tau": [], "median_tau": None if name == "ar" else 3.25,
                "requests": 12, "errors": 4 if rates[-1] is None else 0, "mismatches": 1 if name == "ours" else 0,
                "unchecked": 0, "vs": {base: vs(base) for base in ("ar", "builtin") if base != name}}

    c1 = {"concurrency": 1, "contenders": names, "repeats": 3, "skipped": None, "stopped": None,
          "runs": [{"repeat": r + 1, "complete": True, "results": {n: {"mismatched": []} for n in names}}
                   for r in range(3)],
          "summary": {n: entry(n, INTERLEAVED_TOK_S) for n in names}}
    c8_rates = {n: [8 * INTERLEAVED_TOK_S[n][0]] for n in names[:3]}
    c8 = {"concurrency": 8, "contenders": names[:3], "repeats": 1, "skipped": None,
          "stopped": "after 2 of 3 repeats: time limit (120s) reached",
          "runs": [{"repeat": r + 1, "complete": r == 0, "results": {}} for r in range(2)],
          "summary": {n: entry(n, c8_rates) for n in names[:3]}}
    c64 = {"concurrency": 64, "contenders": names[:3], "repeats": 0, "skipped": "time limit (120s) reached before "
           "this level", "stopped": None, "runs": [], "summary": {}}
    c1["runs"][1]["results"]["ours"]["mismatched"] = [{"id": "math500-301", "index": 40, "margin": None}]
    bench["contenders"][3] = {"name": "ours-tree", "status": "ok", "reason": None, "runs": {}}
    bench["interleaved"] = {"status": "ok", "reason": None, "report": {
        "contenders": {n: f"http://127.0.0.1:{30000 + i}" for i, n in enumerate(names)}, "repeats": 3,
        "prompt_set": "math500", "max_tokens": 256, "levels": [c1, c8, c64]}}
    return bench


def test_interleaved_table_is_the_json_right_after_the_throughput_table():
    bench = interleaved_bench()
    md = bench_report.markdown(bench)
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[1] == "## Interleaved sweep (median of 3 repeats, paired ratios)"
    assert headings[0].startswith("## Throughput")
    assert "The figures the bars are judged on" in md and "interleaved sweep below pairs the runs" in md
    rows = table(md, "| contender | conc | repeats | tok/s | vs AR | vs AR min..max |")
    titles = {v: k for k, v in bench_report.TITLES.items()}
    levels = {lv["concurrency"]: lv for lv in bench["interleaved"]["report"]["levels"]}
    seen = []
    for cells in rows:
        name, c = titles[cells[0]], int(cells[1])
        seen.append((name, c))
        level = levels[c]
        if level["skipped"]:
            assert cells[2] == f"skipped: {level['skipped']}" and set(cells[3:]) == {""}
            continue
        e = level["summary"][name]
        assert cells[2] == f"{level['repeats']}/3" and cells[3] == f"{e['median_tok_s']:.1f}"
        for col, base in ((4, "ar"), (7, "builtin")):
            vs = e["vs"].get(base)
            assert cells[col:col + 2] == (["-", "-"] if vs is None else
                                          [f"{vs['median']:.2f}x", f"{vs['min']:.2f}..{vs['max']:.2f}"])
        assert cells[6] == "-"  # the synthetic runs record no tokens or seconds to pool
        assert cells[9:11] == [f"{e['median_tpot_ms']:.2f}", "12.5"]
        assert cells[13] == ("-" if name == "ar" else "3.25")
        checked = e["requests"] - e["errors"]
        assert cells[14] == ("reference" if name == "ar" else f"{e['mismatches']}/{checked}")
    assert seen == [(n, c) for n in ("ar", "builtin", "ours") for c in (1, 8, 64)] + [("ours-tree", 1)]
    tree = next(r for r in rows if r[0] == "ours (tree)")
    assert tree[3] == "1125.0" and tree[7:9] == [f"{(1300 / 900 + 950 / 700) / 2:.2f}x",
                                                 f"{950 / 700:.2f}..{1300 / 900:.2f}"]
    assert tree[14] == "0/8"  # 12 requests, 4 failed
    assert tree[11:13] == ["-", "-"]  # no per-request latencies in its results
    assert "- c8: after 2 of 3 repeats: time limit (120s) reached" in md.splitlines()
    assert "- c8: 1 incomplete repeat(s) left out (stopped at the time limit)" in md.splitlines()
    assert "then in turn (interleaved sweep)" in md
    assert "- ours (chain), interleaved c=1 repeat 2: math500-301@40" in md.splitlines()


def test_interleaved_load_says_how_many_prompts_and_how_many_in_flight():
    bench = interleaved_bench()
    report = bench["interleaved"]["report"]
    for rounds, expected in ((None, "the whole prompt set, c requests in flight at a time"),
                             (1, "one batch of max(c, 4) prompts"),
                             (3, "max(3 x c, 4) prompts with c in flight at a time (each finished request makes "
                                 "room for the next)")):
        report.update(rounds=rounds, min_requests=4, flush=False)
        assert f"per concurrency c and repeat, {expected} on each" in bench_report.markdown(bench)
    report.update(flush=True)
    md = bench_report.markdown(bench)
    assert "c in flight at a time (each finished request makes room for the next), from an empty radix cache on " \
        "each contender" in md
    assert "its flush was refused" not in md
    report["levels"][0]["runs"][1]["flush_errors"] = {"ours": "HTTP 400: Timed out waiting for idle state."}
    assert "- ours (chain), c1 repeat 2: HTTP 400: Timed out waiting for idle state." in \
        bench_report.markdown(bench).splitlines()


def test_interleaved_latency_and_tail_are_the_requests():
    """Mean request latency and tail per repeat from the runs' requests (failed ones and incomplete repeats left
    out), their medians in the table: a closed batch of 4 at c4 whose slowest request sets its duration."""
    bench = interleaved_bench()
    level = bench["interleaved"]["report"]["levels"][0]
    level["concurrency"] = 4
    for run, latencies, seconds in zip(level["runs"], ([0.2, 0.2, 0.2, 0.6], [0.3, 0.3, 0.3, 0.3], [0.1] * 4),
                                       (0.62, 0.31, 0.11)):
        requests = [{"latency": x, "error": None} for x in latencies] + [{"latency": 9.0, "error": "HTTP 500"}]
        run["results"]["ours"] = {"mismatched": [], "seconds": seconds, "per_request": requests}
    latency_ms, tail = bench_report.request_latency_figures(level, "ours")
    assert latency_ms == pytest.approx(300.0)  # medians of 300, 300, 100 ms
    assert tail == pytest.approx(0.11 / 0.1)  # the median of 0.62 / 0.3, 0.31 / 0.3 and 0.11 / 0.1
    level["runs"][2]["complete"] = False
    assert bench_report.request_latency_figures(level, "ours") == (pytest.approx(300.0), pytest.approx(
        (0.62 / 0.3 + 0.31 / 0.3) / 2))
    row = next(r for r in bench_report.interleaved_rows(bench) if r["contender"] == "ours" and r["concurrency"] == 4)
    assert (row["latency_ms"], row["tail"]) == bench_report.request_latency_figures(level, "ours")
    assert bench_report.request_latency_figures(level, "ar") == (None, None)
    level["concurrency"] = 8  # four requests at c8 still run as one wave
    assert bench_report.request_latency_figures(level, "ours")[1] == pytest.approx((0.62 / 0.3 + 0.31 / 0.3) / 2)


def test_the_pooled_ratio_weighs_each_repeat_by_its_duration():
    """All tokens over all seconds, against AR's the same way, over the complete repeats both ran: a short fast repeat
    counts for its duration (here the median of per-repeat ratios says 1.10x and the pooled ratio 0.87x)."""
    bench = interleaved_bench()
    level = bench["interleaved"]["report"]["levels"][0]
    for run, ours_s, ar_s in zip(level["runs"], (1.0, 4.0, 1.0), (1.1, 3.0, 1.1)):
        run["results"]["ours"].update(output_tokens=1000, seconds=ours_s)
        run["results"]["ar"].update(output_tokens=1000, seconds=ar_s)
    assert bench_report.pooled_ratio(level, "ours", "ar") == pytest.approx((3000 / 6.0) / (3000 / 5.2))
    row = next(r for r in bench_report.interleaved_rows(bench) if r["contender"] == "ours" and r["concurrency"] == 1)
    assert row["vs_ar_pooled"] == pytest.approx(5.2 / 6.0)
    md_row = next(cells for cells in table(bench_report.markdown(bench), "| contender | conc | repeats | tok/s |")
                  if cells[0] == "ours (chain)" and cells[1] == "1")
    assert md_row[6] == f"{5.2 / 6.0:.3f}x"
    level["runs"][1]["complete"] = False  # an incomplete repeat is left out
    assert bench_report.pooled_ratio(level, "ours", "ar") == pytest.approx((2000 / 2.0) / (2000 / 2.2))
    assert bench_report.pooled_ratio(level, "builtin", "ar") is None  # no tokens recorded for it


def test_interleaved_stage_not_run_is_listed_and_absent_has_no_table():
    bench = interleaved_bench()
    bench["interleaved"] = {"status": "skipped", "reason": "time budget spent (12s for it)", "report": None}
    md = bench_report.markdown(bench)
    assert "Interleaved sweep" not in md and "- interleaved sweep: skipped: time budget spent (12s for it)" in md
    assert "interleaved sweep below" not in bench_report.markdown(synthetic_bench())


def test_plots_use_the_interleaved_medians(tmp_path, monkeypatch):
    drawn = recorded_plot_lines(monkeypatch)
    bench = interleaved_bench()
    bench_report.plot(bench, tmp_path, "bench-2026-12-01")
    levels = bench["interleaved"]["report"]["levels"]
    points = {(label, kind): list(zip(*xy)) for (label, xy), kind in zip(drawn, ["toks"] * 4 + ["speedup"] * 3)}
    titles = {v: k for k, v in bench_report.TITLES.items()}
    for (label, kind), pts in points.items():
        name = titles[label]
        key = "median_tok_s" if kind == "toks" else None
        expected = [(lv["concurrency"], lv["summary"][name][key] if key else lv["summary"][name]["vs"]["ar"]["median"])
                    for lv in levels[:2] if name in lv["summary"]]
        assert [x for x, _ in pts] == [x for x, _ in expected]
        assert [y for _, y in pts] == pytest.approx([y for _, y in expected])
    assert "ar" not in {titles[label] for label, kind in points if kind == "speedup"}  # AR is the line at 1


@pytest.mark.parametrize("flags,expected", [
    ("--dtype bfloat16 --disable-prefill-cuda-graph --sleep-on-idle", "; prefill CUDA graphs off"),
    ("--dtype bfloat16 --sleep-on-idle", "; prefill CUDA graphs on"),
    (None, ""),  # a bench.json from before the flags were recorded
])
def test_the_header_says_whether_prefill_graphs_were_on(flags, expected):
    bench = synthetic_bench()
    if flags is not None:
        bench["settings"]["server_flags"] = flags
    header = bench_report.markdown(bench).splitlines()[2]
    assert bench_report.prefill_graphs_note(flags) == expected
    assert ("prefill CUDA graphs" in header) is bool(expected) and (not expected or expected + "." in header)


def test_the_header_says_when_every_server_ran_its_largest_level_whole():
    """bench.json records --max-running-requests per server since 2026-11-30; older ones, without it, say nothing."""
    bench = synthetic_bench()
    assert "--max-running-requests" not in bench_report.markdown(bench).splitlines()[2]
    bench["settings"]["max_running_requests"] = {"ar": 64, "ours": 64}
    assert "each server runs its largest level's requests at once (`--max-running-requests`" in (
        bench_report.markdown(bench).splitlines()[2])


def test_a_sweep_no_contender_ran_says_so_instead_of_an_empty_table():
    bench = interleaved_bench()
    for contender in bench["contenders"]:
        contender["runs"].pop("sweep", None)
    lines = bench_report.markdown(bench).splitlines()
    at = lines.index("## Throughput")
    assert lines[at + 2].startswith("Not run: no contender had time left for the sequential sweep")
    assert "| contender | conc | requests | tok/s |" not in "\n".join(lines)
    assert "## Interleaved sweep (median of 3 repeats, paired ratios)" in lines


def test_prefill_batches_per_server_are_the_logs_counts():
    bench = synthetic_bench()
    assert "## Prefill batches" not in bench_report.markdown(bench)  # no counts in the JSON: no section
    counts = {"ar": (160, 94, 37, 37), "builtin": (416, 308, 206, 206), "ours": (413, 292, 192, 192)}
    for contender in bench["contenders"]:
        if contender["name"] in counts:
            contender["prefills"] = dict(zip(("batches", "single_request", "eager", "one_token"),
                                             counts[contender["name"]]))
    rows = table(bench_report.markdown(bench), "| server | prefill batches | of one request | eager | of one token |")
    assert rows == [["AR", "160", "94", "37", "37"], ["builtin DFLASH", "416", "308", "206", "206"],
                    ["ours (chain)", "413", "292", "192", "192"]]
