"""The command line: `python -m fastattn info | check | bench`, benchmarks/softmax.py and
benchmarks/attention.py, and the benchmark engine's measurements (FLOP counts, peak memory,
the targets block)."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn.benchmark import FWD, FWD_BWD, Case, Impl, Result, Timing, attention_flops, measure, report, suites
from fastattn.benchmark.cli import run_and_report
from fastattn.benchmark.engine import measure_group, run_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# The commands run as a user runs them: without the TRITON_INTERPRET the tests set, so that
# Triton stays unloaded (and check does not self-test it through its slow interpreter).
CLI_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run(*args):
    """Runs a command with this interpreter from the repository root; returns the process."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=CLI_ENV, capture_output=True, text=True, timeout=600
    )


def test_info_prints_json_with_every_backend():
    proc = run("-m", "fastattn", "info")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["fastattn"] == fastattn.__version__
    assert set(info["backends"]) == set(fastattn.BACKENDS)
    for name, entry in info["backends"].items():
        assert isinstance(entry["usable"], bool), name
        assert (entry["reason"] is None) == entry["usable"], name
    assert info["backends"]["reference"]["usable"]


def test_check_prints_one_verdict_per_backend():
    proc = run("-m", "fastattn", "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    verdicts = {line.split()[0]: line.split()[1] for line in lines}
    assert len(lines) == len(fastattn.BACKENDS) and set(verdicts) == set(fastattn.BACKENDS), proc.stdout
    assert set(verdicts.values()) <= {"PASS", "SKIP"}, proc.stdout
    assert verdicts["reference"] == "PASS"
    usable = {name for name, entry in fastattn.backends().items() if entry["usable"]} - {"triton"}
    assert {name for name, verdict in verdicts.items() if verdict == "PASS"} >= usable


@pytest.mark.parametrize(
    "args",
    [["bench", "--suite", "nope"], ["bench", "--device", "tpu"], ["bench", "--quick", "extra"], ["frobnicate"]],
    ids=["suite", "device", "extra", "command"],
)
def test_bad_arguments_exit_2(args):
    proc = run("-m", "fastattn", *args)
    assert proc.returncode == 2
    assert "error" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_on_cuda_without_gpu_exits_1(tmp_path):
    proc = run("-m", "fastattn", "bench", "--device", "cuda", "--tiny", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert "--device cuda" in proc.stderr and "GPU" in proc.stderr
    assert not os.listdir(tmp_path)


RESULT_TYPES = {
    "suite": str, "case": str, "pass": str, "impl": str, "device": str, "status": str, "x": int,
    "series": str, "params": dict,
}
OK_TYPES = {"ms": float, "reps": int, "throughput": float, "unit": str, "baseline": str, "speedup": float}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["-m", "fastattn", "bench", "--tiny", "--suite", "encoder", "softmax", "--no-progress", "--out", str(out)]
    proc = run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out / "results.json") as f:
        return proc, out, json.load(f)


def test_bench_json_schema(bench_run):
    _, _, doc = bench_run
    assert doc["schema"] == 1 and doc["device"] == "cpu" and doc["suites"] == ["encoder", "softmax"]
    assert "fastattn bench" in doc["command"] and "--tiny" in doc["command"]
    assert isinstance(doc["cpu_model"], str) and doc["cpu_model"] and doc["gpu_model"] is None
    assert doc["versions"]["torch"] == torch.__version__
    assert set(doc["versions"]["backends"]) == set(fastattn.BACKENDS)
    assert isinstance(doc["unavailable"], dict)
    results = doc["results"]
    for r in results:
        for key, kind in RESULT_TYPES.items():
            assert isinstance(r[key], kind), (key, r)
        assert r["status"] in ("ok", "skipped"), r
        assert r["pass"] in (FWD, FWD_BWD)
        if r["status"] == "ok":
            for key, kind in OK_TYPES.items():
                assert isinstance(r[key], kind), (key, r)
            assert r["ms"] > 0 and r["throughput"] > 0 and r["speedup"] > 0
            assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        else:
            assert r["note"], r


def test_bench_compares_against_pytorch(bench_run):
    _, _, doc = bench_run
    groups = {}
    for r in doc["results"]:
        groups.setdefault((r["suite"], r["case"], r["pass"]), {})[r["impl"]] = r
    assert {suite for suite, _, _ in groups} == {"encoder", "softmax"}
    for (suite, _, _), impls in groups.items():
        expected = {"sdpa", "eager"} if suite == "encoder" else {"torch"}
        expected |= {f"fastattn-{name}" for name in ("cpu",) if fastattn.backends()[name]["usable"]}
        assert set(impls) == expected
        baseline = "sdpa" if suite == "encoder" else "torch"
        assert impls[baseline]["status"] == "ok" and impls[baseline]["speedup"] == 1.0
        for r in impls.values():
            if r["status"] == "ok":  # speedup = baseline time / own time
                assert r["speedup"] == pytest.approx(impls[baseline]["ms"] / r["ms"])
                assert r["unit"] == ("GFLOP/s" if suite == "encoder" else "GB/s")


def test_bench_counts_attention_flops(bench_run):
    _, _, doc = bench_run
    for r in doc["results"]:
        if r["suite"] == "encoder" and r["status"] == "ok":
            p = r["params"]
            forward = 4 * p["batch"] * p["heads_q"] * p["seq_q"] * p["seq_k"] * p["head_dim"]
            assert r["flops"] == (forward if r["pass"] == FWD else 3.5 * forward)
            assert r["throughput"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e9)


def test_bench_csv_and_table(bench_run):
    proc, out, doc = bench_run
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    assert tuple(header[: len(report.CSV_FIELDS)]) == report.CSV_FIELDS
    assert {"batch", "heads_q", "seq_q", "seq_k", "dtype"} <= set(header)
    assert len(rows) == 1 + len(doc["results"])
    assert all(len(row) == len(header) for row in rows)
    assert "== encoder (cpu, float32) ==" in proc.stdout and "== softmax (cpu, float32) ==" in proc.stdout
    assert "GFLOP/s" in proc.stdout and "vs sdpa" in proc.stdout and "peak MiB" in proc.stdout


def test_bench_prints_rows_as_measured_then_the_summary(bench_run):
    proc, _, doc = bench_run
    live, summary = proc.stdout.split("== encoder (cpu, float32) ==", 1)
    encoder_rows, softmax_rows = "-- encoder (cpu, float32), as measured --", "-- softmax (cpu, float32), as measured --"
    assert live.index(encoder_rows) < live.index(softmax_rows)
    assert "== softmax (cpu, float32) ==" in summary
    live_rows = [line for line in live.splitlines() if line.startswith("B")]  # case labels: "B4 H2 ..."
    assert len(live_rows) == len(doc["results"])
    for line, r in zip(live_rows, doc["results"]):  # in the order they were measured
        assert re.match(rf"{re.escape(r['case'])} +{re.escape(r['pass'])} +{re.escape(r['impl'])} ", line), line


def test_run_cases_prints_each_group_before_measuring_the_next():
    events = []

    def impl(name):
        def fn(inputs):
            events.append(("ran", name))
            return inputs["x"].exp()

        return Impl(name, fn)

    def format_group(group):
        events.append(("printed", group[0].pass_))
        return [f"{r.impl} {r.pass_}" for r in group]

    timing = Timing(min_reps=1, budget_s=0.0, max_reps=1)
    run_cases([_toy_case([impl("base"), impl("other")])], "cpu", timing, progress=False, format_group=format_group)
    printed = [i for i, event in enumerate(events) if event[0] == "printed"]
    assert [events[i][1] for i in printed] == [FWD, FWD_BWD]
    # the fwd rows are printed before any fwd+bwd step runs
    first_backward = next(i for i, event in enumerate(events) if i > printed[0] and event[0] == "ran")
    assert printed[0] < first_backward < printed[1]


def test_plot_titles_name_batch_heads_dtype_and_device():
    rows = [Result("encoder", f"B{b}", FWD, "sdpa", "cpu", "ok", x, "D=16", {"batch": b, "heads_q": 2, "dtype": "float32"})
            for b, x in ((4, 32), (2, 64))]
    assert report._plot_title("encoder", FWD, "D=16", rows) == "encoder fwd D=16\nbatch 4 to 2, heads 2, float32, cpu"


def test_bench_writes_a_plot_per_suite_and_pass(bench_run):
    _, out, _ = bench_run
    pytest.importorskip("matplotlib")
    expected = {f"{suite}_{p}.png" for suite in ("encoder", "softmax") for p in ("fwd", "fwd_bwd")}
    assert {name for name in os.listdir(out) if name.endswith(".png")} == expected
    for name in expected:
        with open(out / name, "rb") as f:
            data = f.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name


def test_softmax_script_runs_the_softmax_suite(tmp_path):
    proc = run("benchmarks/softmax.py", "--tiny", "--no-progress", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "results.json") as f:
        doc = json.load(f)
    assert doc["suites"] == ["softmax"] and {r["suite"] for r in doc["results"]} == {"softmax"}
    proc = run("benchmarks/softmax.py", "--suite", "encoder")
    assert proc.returncode == 2  # the script has no --suite


def test_attention_script_checks_the_targets_from_its_results(tmp_path):
    proc = run("benchmarks/attention.py", "--tiny", "--no-progress", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "results.json") as f:
        doc = json.load(f)
    assert doc["suites"] == ["targets"] and {r["suite"] for r in doc["results"]} == {"targets"}
    found = {(r["case"], r["pass"], r["impl"]): r for r in doc["results"]}
    ceilings = [r for r in doc["results"] if "ceiling" in r["params"]]
    attention = [r for r in doc["results"] if "ceiling" not in r["params"]]
    assert {r["params"]["dtype"] for r in attention} == {"float32", "bfloat16"}
    masks = {r["params"]["mask"] for r in attention}
    assert masks == {"none", "last half hidden"}
    # The roofline: the ceilings measured in this run, every attention rate a fraction of each.
    rates = {r["params"]["ceiling"]: r["throughput"] for r in ceilings}
    native = {"peak FMA rate", "tile GEMM in L1"} if fastattn.ops._C is not None else set()
    assert set(rates) == native | {"sgemm"}
    assert all(rate > 0 for rate in rates.values()) and "== roofline" in proc.stdout
    assert doc["roofline"]["ceilings"] == pytest.approx(rates)
    rows = {(r["case"], r["pass"], r["impl"]): r for r in doc["roofline"]["rows"]}
    assert rows and all(rows[key]["of sgemm"] == pytest.approx(found[key]["throughput"] / rates["sgemm"])
                        for key in rows)
    memory = [r for r in doc["results"] if r["case"].startswith("memory ")]
    assert memory and all(r["pass"] == FWD and r["reps"] == 1 for r in memory)  # one timed forward
    assert {r["impl"] for r in memory} <= {"fastattn-cpu", "eager"}
    assert doc["targets"] and "== targets ==" in proc.stdout
    usable = fastattn.backends()["cpu"]["usable"]
    for target in doc["targets"]:
        if not usable:  # fastattn-cpu did not run: nothing to check the targets with
            assert target["value"] is None and target["met"] is None and target["note"]
            continue
        subject = found[tuple(target["subject"])]
        if target["quantity"] == "peak MB":
            assert target["value"] == pytest.approx(subject["peak_mem_bytes"] / 1e6)
        elif target["quantity"] == "fraction":
            reference = found[tuple(target["reference"])]
            assert target["value"] == pytest.approx(subject["throughput"] / reference["throughput"])
        else:
            reference = found[tuple(target["reference"])]
            ratio = reference["ms"] / subject["ms"]
            assert target["value"] == pytest.approx(ratio if target["quantity"] == "speedup" else 1 / ratio)
        assert target["met"] == {">=": target["value"] >= target["bound"], "<=": target["value"] <= target["bound"],
                                 "<": target["value"] < target["bound"]}[target["op"]]


def _result(case, pass_, impl, ms, peak=None):
    return Result("targets", case, pass_, impl, "cpu", "ok", 512, "", {}, ms=ms, peak_mem_bytes=peak)


def test_targets_block_is_computed_from_the_results():
    targets = suites.targets(["targets"], "cpu", "full")
    label = {t.text: t for t in targets}
    assert len(targets) == 13 and len(label) == 13
    base = label["forward, no mask: fastattn / SDPA speed"]
    bf16 = label["base fwd: fastattn bf16 time / its fp32 time"]
    memory = label["one long forward: fastattn peak memory increase (MB)"]
    assert base.subject[2] == "fastattn-cpu" and base.reference[2] == "sdpa" and base.bound == 1.3
    # bf16 is compared with fp32 copies of its own inputs, timed in the same rounds
    assert bf16.reference == (bf16.subject[0], bf16.subject[1], suites.FP32_TWIN)

    def check(base_ms, bf16_ms, peak_bytes):
        results = [
            _result(*base.subject, base_ms), _result(*base.reference, 100.0),
            _result(*bf16.subject, bf16_ms), _result(*bf16.reference, base_ms),
            _result(*memory.subject, 50.0, peak_bytes),
        ]
        return {c["text"]: c for c in report.check_targets([base, bf16, memory], results)}

    checked = check(base_ms=50.0, bf16_ms=45.0, peak_bytes=25 * 10**6)
    assert checked[base.text]["value"] == pytest.approx(2.0) and checked[base.text]["met"] is True
    assert checked[bf16.text]["value"] == pytest.approx(0.9) and checked[bf16.text]["met"] is True
    assert checked[memory.text]["value"] == pytest.approx(25.0) and checked[memory.text]["met"] is True
    checked = check(base_ms=80.0, bf16_ms=100.0, peak_bytes=100 * 10**6)
    assert checked[base.text]["value"] == pytest.approx(1.25) and checked[base.text]["met"] is False
    assert checked[bf16.text]["value"] == pytest.approx(1.25) and checked[bf16.text]["met"] is False
    assert checked[memory.text]["met"] is False  # the bound is strict: < 100 MB
    text = report.format_targets(list(checked.values()))
    assert "x1.25  >= 1.3" in text and "NOT MET" in text and "0 of 3 targets met" in text

    # A result that is missing or did not run leaves its target unmeasured, never met.
    skipped = _result(*base.subject, None)
    skipped.status, skipped.note = "skipped", "ValueError: no"
    checked = report.check_targets([base, bf16], [skipped, _result(*base.reference, 100.0)])
    assert [c["met"] for c in checked] == [None, None]
    assert "skipped: ValueError: no" in checked[0]["note"] and "not run" in checked[1]["note"]
    assert "not measured (" in report.format_targets(checked)


def test_attention_flops_rules():
    assert attention_flops(2, 3, 5, 7, 16) == {FWD: 4 * 2 * 3 * 5 * 7 * 16, FWD_BWD: 14 * 2 * 3 * 5 * 7 * 16}
    assert attention_flops(1, 1, 8, 8, 16, causal=True)[FWD] == 2 * 8 * 8 * 16  # halved when square
    assert attention_flops(1, 1, 4, 8, 16, causal=True)[FWD] == 4 * 4 * 8 * 16  # not halved otherwise
    assert attention_flops(1, 1, 4, 8, 16, head_dim_v=32)[FWD] == 2 * 4 * 8 * (16 + 32)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux /proc")
def test_cpu_peak_memory_sees_the_step_allocations():
    mib = 2**20

    def step(n):
        x = torch.ones(n * mib // 4)  # touched pages: resident
        y = x + 1  # a second temporary, alive together with x
        return y.sum()

    for n in (16, 64):
        peak = measure.peak_memory(lambda: step(n), "cpu")
        assert 2 * n * mib - mib <= peak < 2 * n * mib + 8 * mib, (n, peak / mib)


def _toy_case(impls):
    def make_inputs(requires_grad):
        return {"x": torch.randn(4, 64, requires_grad=requires_grad)}

    return Case("toy", "4x64", {"rows": 4}, make_inputs, impls, baseline="base", x=64, flops={FWD: 512, FWD_BWD: 1536})


def test_engine_reports_declined_and_failing_implementations(tmp_path, capsys):
    def refuses(inputs):
        raise ValueError("does not take these inputs")

    def crashes(inputs):
        raise RuntimeError("kernel bug")

    impls = [
        Impl("base", lambda i: i["x"].exp()),
        Impl("twice", lambda i: i["x"].exp().exp()),
        Impl("refuses", refuses, declines=(ValueError,)),
        Impl("crashes", crashes, declines=(ValueError,)),
    ]
    timing = Timing(min_reps=2, budget_s=0.0, max_reps=2)
    code = run_and_report([_toy_case(impls)], "cpu", str(tmp_path), timing, "tiny", ["toy"], progress=False)
    assert code == 1  # an implementation crashed
    assert "error: toy 4x64 fwd crashes: RuntimeError: kernel bug" in capsys.readouterr().err
    with open(tmp_path / "results.json") as f:
        results = {(r["impl"], r["pass"]): r for r in json.load(f)["results"]}
    for pass_ in (FWD, FWD_BWD):
        assert results["base", pass_]["status"] == "ok" and results["base", pass_]["speedup"] == 1.0
        assert results["twice", pass_]["status"] == "ok" and results["twice", pass_]["baseline"] == "base"
        assert results["refuses", pass_]["status"] == "skipped"
        assert results["refuses", pass_]["note"] == "ValueError: does not take these inputs"
        assert results["crashes", pass_]["status"] == "error" and results["crashes", pass_]["ms"] is None


def test_cpu_timing_interleaves_implementations_and_isolates_failures():
    calls = []

    def recorder(name, fail_at=None):
        def fn(inputs):
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} failed on call {fail_at}")
            return inputs["x"] * 2

        return fn

    impls = [Impl("base", recorder("base")), Impl("other", recorder("other")), Impl("flaky", recorder("flaky", 3))]
    results, ran = measure_group(_toy_case(impls), FWD, "cpu", Timing(min_reps=3, budget_s=0.0, max_reps=3))
    # One warm-up each, then rounds of base, other, flaky until flaky fails in its second round.
    assert calls == ["base", "other", "flaky"] + ["base", "other", "flaky"] * 2 + ["base", "other"]
    status = {r.impl: (r.status, r.reps) for r in results}
    assert status == {"base": ("ok", 3), "other": ("ok", 3), "flaky": ("error", None)}
    assert [r.impl for r, _ in ran] == ["base", "other"]


@pytest.mark.skipif(fastattn.ops._C is None, reason="the phase timers are in the compiled CPU kernels")
def test_phases_script_breaks_the_forward_down(tmp_path):
    """benchmarks/phases.py: every phase of the forward and backward kernels timed, the GEMM
    phases never empty, the shares summing to 1."""
    out = tmp_path / "phases.json"
    proc = run("benchmarks/phases.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        doc = json.load(f)
    assert doc["peak_gflops"] > 0 and [row["pass"] for row in doc["rows"]] == ["forward"] * 3 + ["backward"] * 3
    gemms = {"forward": ("scores", "values"), "backward": ("recompute", "products")}
    for row in doc["rows"]:
        shares = row["phase share"]
        assert list(shares) == list(getattr(fastattn.ops._C, f"cpu_{row['pass']}_phases"))
        assert sum(shares.values()) == pytest.approx(1.0, abs=0.01) and min(shares.values()) >= 0
        assert all(shares[name] > 0 and row[f"{name} GEMM / peak"] > 0 for name in gemms[row["pass"]])
        assert row["ms"] > 0


@pytest.mark.skipif(fastattn.ops._C is None, reason="the phase timers are in the compiled CPU kernels")
def test_phase_timer_refuses_the_few_query_kernel():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="phase timing covers the many-query forward kernel"):
        fastattn.ops._C.cpu_forward_phase_ns(q, q, q)
