"""Output of a benchmark run: the table, the targets block, JSON, CSV and PNG plots."""
import argparse
import csv
import dataclasses
import datetime
import json
import operator
import os
import platform
import shlex
import sys
from typing import Optional

import torch

# CSV columns: these, then the cases' params (sorted union).
CSV_FIELDS = (
    "suite", "case", "pass", "impl", "device", "status", "ms", "reps", "flops", "throughput", "unit",
    "baseline", "speedup", "peak_mem_bytes", "x", "series", "note",
)


def _cpuinfo():
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model():
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them:
    virtual machines often report only a brand ("AMD EPYC"), which covers several designs."""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


# Instructions that run bf16 (and fp16) products faster than fp32 FMAs: where the CPU has them,
# PyTorch's bf16 kernels (oneDNN) can outrun any fp32-FMA kernel, fastattn's included.
LOW_PRECISION_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def cpu_low_precision_units():
    """Which of LOW_PRECISION_FLAGS the CPU reports (from /proc/cpuinfo's flags)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in LOW_PRECISION_FLAGS if flag in flags]


def cpu_kernel_isa():
    """The instruction-set variant fastattn's CPU kernels run (None without the extension)."""
    from fastattn import ops

    return ops._C.cpu_kernel_isa() if ops._C is not None else None


def environment(device):
    """Where and with what the run happened: device, CPU/GPU model, threads, versions."""
    import fastattn

    return {
        "device": device,
        "cpu_model": cpu_model(),
        "cpu_kernel_isa": cpu_kernel_isa(),
        "cpu_low_precision_units": cpu_low_precision_units(),
        "cpu_threads": torch.get_num_threads(),
        "gpu_model": torch.cuda.get_device_name() if device == "cuda" else None,
        "platform": platform.platform(),
        "versions": fastattn.info(),
    }


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _header(unit, baseline):
    return ("case", "pass", "impl", "ms", unit, f"vs {baseline.split('-')[0]}", "peak MiB", "note")


def _cells(r):
    """A result's cells under _header."""
    mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
    speedup = "-" if r.speedup is None else f"x{r.speedup:.2f}"
    note = r.note or ""
    if r.status != "ok":  # the full message is in the JSON
        note = f"{r.status}: {note[:100]}"
    return (r.case, r.pass_, r.impl, _fmt(r.ms), _fmt(r.throughput), speedup, _fmt(mem), note)


def _line(cells, widths):
    """Cells padded to widths (numbers right-aligned); the last cell (the note) is not padded."""
    padded = [str(c).rjust(w) if 3 <= i <= 6 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    return "  ".join(padded + [str(cells[-1])]).rstrip()


def _suite_title(suite, device, dtypes):
    return f"== {suite} ({device}, {'/'.join(dict.fromkeys(dtypes))}) =="


def format_table(results):
    """A table per suite: one row per implementation, case and pass."""
    lines = []
    for suite in dict.fromkeys(r.suite for r in results):
        rows = [r for r in results if r.suite == suite]
        unit = next((r.unit for r in rows if r.unit), "throughput")
        baseline = next((r.baseline for r in rows if r.baseline), "baseline")
        header = _header(unit, baseline)
        table = [_cells(r) for r in rows]
        widths = [max(len(str(row[i])) for row in [header] + table) for i in range(len(header) - 1)]
        lines.append(_suite_title(suite, rows[0].device, (r.params.get("dtype", "") for r in rows)))
        previous = None
        for row in [header] + table:
            key = row[:2]
            shown = list(row)
            if key == previous:  # print case and pass once per group
                shown[0] = shown[1] = ""
            previous = key
            lines.append(_line(shown, widths))
        lines.append("")
    return "\n".join(lines)


class LiveRows:
    """The rows of a run printed as each group (a case and pass) is measured, before the
    summary table. Columns are sized from every case and implementation up front. Peak
    memory is measured after all timing, so its column is left to the summary."""

    NUMBER_WIDTH = 9

    def __init__(self, cases, device):
        self.device = device
        self.dtypes = {}
        for case in cases:
            self.dtypes.setdefault(case.suite, []).append(case.params.get("dtype", ""))
        self.widths = (
            max([len("case")] + [len(case.label) for case in cases]),
            len("fwd+bwd"),
            max([len("impl")] + [len(impl.name) for case in cases for impl in case.impls]),
            *(self.NUMBER_WIDTH,) * 3,
        )
        self.suite = None

    def format_group(self, group):
        """Lines for one measured group (a list of Results): a title and header when a new
        suite starts, then a row per implementation."""
        lines = []
        suite = group[0].suite
        if suite != self.suite:
            self.suite = suite
            unit = next((r.unit for r in group if r.unit), "throughput")
            baseline = next((r.baseline for r in group if r.baseline), "baseline")
            title = _suite_title(suite, self.device, self.dtypes[suite]).strip("= ")
            lines += [f"-- {title}, as measured --", self._line(_header(unit, baseline))]
        lines += [self._line(_cells(r)) for r in group]
        return lines

    def _line(self, cells):
        return _line(cells[:6] + cells[7:], self.widths)  # without the peak memory column


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal checked against a run's results. subject and reference name a result as
    (case label, pass, impl). quantity: "speedup" (reference ms / subject ms), "time ratio"
    (subject ms / reference ms), "fraction" (subject throughput / reference throughput: of a
    ceiling) or "peak MB" (subject's peak memory increase, 10^6 bytes).
    Met when `value op bound` holds."""

    text: str
    quantity: str
    subject: tuple
    op: str  # ">=", "<=" or "<"
    bound: float
    reference: Optional[tuple] = None


_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


def _target_value(target, results):
    """The measured value of a target, or (None, why) when a result it needs is missing."""
    found = {(r.case, r.pass_, r.impl): r for r in results}
    needed = [target.subject] + ([target.reference] if target.reference else [])
    for key in needed:
        result = found.get(tuple(key))
        if result is None or result.status != "ok":
            return None, f"{' '.join(key)}: " + ("not run" if result is None else f"{result.status}: {result.note}")
    subject = found[tuple(target.subject)]
    if target.quantity == "peak MB":
        if subject.peak_mem_bytes is None:
            return None, "peak memory not measurable here"
        return subject.peak_mem_bytes / 1e6, None
    reference = found[tuple(target.reference)]
    if target.quantity == "speedup":
        return reference.ms / subject.ms, None
    if target.quantity == "time ratio":
        return subject.ms / reference.ms, None
    if target.quantity == "fraction":
        return subject.throughput / reference.throughput, None
    raise ValueError(f"target {target.text!r}: unknown quantity {target.quantity!r}")


def roofline(results):
    """Each FLOP rate of a run that measured ceilings (cases with params["ceiling"]) as a
    fraction of each ceiling: {"ceilings": {name: rate}, "rows": [...]}, or None."""
    ceilings = {r.params["ceiling"]: r.throughput for r in results
                if "ceiling" in r.params and r.status == "ok" and r.throughput}
    if not ceilings:
        return None
    rows = [{"case": r.case, "pass": r.pass_, "impl": r.impl, "throughput": r.throughput,
             **{f"of {name}": r.throughput / rate for name, rate in ceilings.items()}}
            for r in results
            if "ceiling" not in r.params and r.status == "ok" and r.flops and r.throughput]
    return {"unit": next(r.unit for r in results if r.unit), "ceilings": ceilings, "rows": rows}


def format_roofline(document):
    """The roofline block: the ceilings, then every FLOP rate as a fraction of each."""
    unit, names = document["unit"], list(document["ceilings"])
    lines = ["== roofline (ceilings measured in this run) =="]
    lines += [f"{name}: {_fmt(rate)} {unit}" for name, rate in document["ceilings"].items()]
    header = ("case", "pass", "impl", unit, *(f"of {name}" for name in names))
    table = [(r["case"], r["pass"], r["impl"], _fmt(r["throughput"]), *(f"{r[f'of {n}']:.2f}" for n in names))
             for r in document["rows"]]
    widths = [max(len(str(row[i])) for row in [header] + table) for i in range(len(header))]
    for row in [header] + table:
        lines.append("  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines) + "\n"


def check_targets(targets, results):
    """One record per target: the target, its measured value and whether it is met (None
    when it could not be measured, with the reason in "note")."""
    checked = []
    for target in targets:
        value, note = _target_value(target, results)
        record = dataclasses.asdict(target)
        record.update(value=value, met=None if value is None else bool(_OPS[target.op](value, target.bound)))
        record["note"] = note
        checked.append(record)
    return checked


def format_targets(checked):
    """The targets block printed after the table: target, measured value, bound, verdict."""
    rows = []
    for record in checked:
        fmt = {"peak MB": "{:.1f}", "fraction": "{:.2f}"}.get(record["quantity"], "x{:.2f}")
        value = "-" if record["value"] is None else fmt.format(record["value"])
        verdict = {True: "met", False: "NOT MET", None: f"not measured ({record['note']})"}[record["met"]]
        rows.append((record["text"], value, f"{record['op']} {record['bound']:g}", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["== targets =="]
    for text, value, bound, verdict in rows:
        lines.append(f"{text.ljust(widths[0])}  {value.rjust(widths[1])}  {bound.ljust(widths[2])}  {verdict}")
    met = sum(record["met"] is True for record in checked)
    lines.append(f"{met} of {len(checked)} targets met")
    return "\n".join(lines) + "\n"


def script_args(doc, out_name, quick_help, extra=(), parts=()):
    """Arguments of a standalone benchmark script: --quick, --out (default
    benchmarks/results/<out_name>), the script's own `extra` ((flag, add_argument kwargs)) and,
    when the script has `parts` (names), --only PART."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", out_name))
    for flag, options in extra:
        parser.add_argument(flag, **options)
    if parts:
        parser.add_argument("--only", choices=parts, help="run this part only (default: all)")
    return parser.parse_args()


def check_figures(rows, figures, targets):
    """The rows ({"case": ..., implementation: ms}) and figures of a standalone benchmark
    script, the figures against their targets ({figure: (bound, "min" = at least / "max" = at
    most)}): prints both and returns the records (figure, value, target, met) for its JSON."""
    print(f"{'case':<52} times (ms)")
    for row in rows:
        print(f"{row['case']:<52} " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "case"))
    print(f"\n{'figure':<52} {'value':>8}  target")
    checked = []
    for figure, value in figures.items():
        bound, kind = targets[figure]
        met = value >= bound if kind == "min" else value <= bound
        target = f"{'>=' if kind == 'min' else '<='} {bound}"
        checked.append({"figure": figure, "value": round(value, 3), "target": target, "met": met})
        print(f"{figure:<52} {value:8.3f}  {target}  {'met' if met else 'NOT MET'}")
    return checked


def write_figures(path, rows, figures, targets):
    """A standalone script's results: the rows and figures checked against their targets
    (check_figures, printed), written with the run's command and environment as JSON at path."""
    checked = check_figures(rows, figures, targets)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"command": command_line(), "environment": environment("cpu"), "threads": torch.get_num_threads(),
                   "rows": rows, "targets": checked}, f, indent=1)
    print(f"\nwrote {path}")


def write_json(path, results, meta):
    document = dict(meta)
    document["results"] = [r.to_dict() for r in results]
    with open(path, "w") as f:
        json.dump(document, f, indent=2)


def write_csv(path, results):
    records = [r.to_dict() for r in results]
    param_fields = sorted({key for record in records for key in record["params"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS + tuple(param_fields))
        for record in records:
            row = [record[field] for field in CSV_FIELDS] + [record["params"].get(key) for key in param_fields]
            writer.writerow(["" if value is None else value for value in row])


def _plot_title(suite, pass_, series, rows):
    """suite, pass and series, then batch, heads, dtype and device; a parameter that changes
    along the x axis (batch, where the token count is fixed) shows its first and last value."""
    details = []
    for key, name in (("batch", "batch"), ("heads_q", "heads"), ("dtype", "")):
        values = list(dict.fromkeys(r.params[key] for r in sorted(rows, key=lambda r: r.x) if key in r.params))
        if values:
            shown = str(values[0]) if len(values) == 1 else f"{values[0]} to {values[-1]}"
            details.append(f"{name} {shown}".strip())
    details.append(rows[0].device)
    return " ".join(filter(None, (suite, pass_, series))) + "\n" + ", ".join(details)


def plot(results, out_dir):
    """One PNG per (suite, pass): time vs sequence length, a line per implementation, a
    subplot per series (head dim). Returns the paths written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    paths = []
    for suite, pass_ in dict.fromkeys((r.suite, r.pass_) for r in results):
        group = [r for r in results if r.suite == suite and r.pass_ == pass_]
        series = list(dict.fromkeys(r.series for r in group))
        figure, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
        for ax, name in zip(axes[0], series):
            for impl in dict.fromkeys(r.impl for r in group):
                points = sorted((r.x, r.ms) for r in group if r.series == name and r.impl == impl and r.ms is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            xs = sorted({r.x for r in group if r.series == name})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
            times = [r.ms for r in group if r.series == name and r.ms is not None]
            ax.yaxis.set_major_formatter(plain)
            # Ticks at 2x and 5x each power of ten, labelled unless the times span many decades.
            ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(plain if times and max(times) < 100 * min(times) else ticker.NullFormatter())
            ax.set_xlabel("sequence length (keys, log scale)")
            ax.set_ylabel("time (ms, median, log scale)")
            ax.set_title(_plot_title(suite, pass_, name, [r for r in group if r.series == name]))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        figure.tight_layout()
        path = os.path.join(out_dir, f"{suite}_{pass_.replace('+', '_')}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def write_outputs(out_dir, results, meta):
    """Writes results.json, results.csv and the plots into out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.csv")
    write_json(json_path, results, meta)
    write_csv(csv_path, results)
    return [json_path, csv_path] + plot(results, out_dir)


def command_line():
    """This process's command line, the interpreter by name only: the record describes the
    run, not this machine's paths."""
    return shlex.join([os.path.basename(sys.orig_argv[0])] + sys.orig_argv[1:])


def run_metadata(device, scale, suites, unavailable):
    """The JSON header of a run: environment, command line, settings."""
    meta = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "scale": scale,
        "suites": list(suites),
        "unavailable": unavailable,
    }
    meta.update(environment(device))
    return meta
