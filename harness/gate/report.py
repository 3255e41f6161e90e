"""Run outputs: result.json per model, summary.json, the console table, and the run reports
(junit.xml, summary.md, loss_curves.png). Every file is written atomically (temp file + rename), so
an interrupted run never leaves a half-written file."""

from __future__ import annotations

import io
import math
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.contract.files import write_bytes_atomic
from harness.contract.records import ModelResult, read_metrics
from harness.gate.environment import redact_secrets
from harness.gate.verdict import FAIL, NOT_JUDGED, PASS

JUNIT_FILE = "junit.xml"
SUMMARY_MD_FILE = "summary.md"
LOSS_PLOT_FILE = "loss_curves.png"
JUNIT_CLASSNAME = "sft-harness"


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A plain table on stdout (rich when available: it keeps columns aligned in any terminal)."""
    try:
        from rich.console import Console  # optional: not a declared dependency
        from rich.table import Table
    except ImportError:  # fall back to aligned plain text
        widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        for line in [columns, *rows]:
            print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console(width=max(100, os.get_terminal_size().columns if os.isatty(1) else 160)).print(table)


# --------------------------------------------------------------------------------------------------
# Run reports: junit.xml (CI), summary.md (humans), loss_curves.png (one look at every model)


def write_run_reports(run_dir: Path, results: list[ModelResult], summary: dict) -> list[Path]:
    """junit.xml, summary.md and loss_curves.png in run_dir, each written atomically. A report that
    cannot be made (a plotting error, a full disk) is a one-line warning on stderr, never an
    exception: the reports describe the verdict, they do not decide it. Returns the paths written."""

    run_dir = Path(run_dir)
    summary = redact_secrets(dict(summary))
    makers = (
        (JUNIT_FILE, lambda: junit_xml(results, summary).encode("utf-8")),
        (SUMMARY_MD_FILE, lambda: summary_markdown(results, summary).encode("utf-8")),
        (
            LOSS_PLOT_FILE,
            lambda: loss_curves_png(run_dir, results, title=f"Run {summary.get('run_id') or run_dir.name}"),
        ),
    )
    written = []
    for name, make in makers:
        path = run_dir / name
        try:
            write_bytes_atomic(path, make())
        except Exception as exc:  # noqa: BLE001 - a report never takes the gate down
            print(f"warning: could not write {path}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        written.append(path)
    return written


def metrics_path(run_dir: Path, result: ModelResult) -> Path:
    return Path(run_dir) / result.folder / result.metrics_file


def time_to_verdict(result: ModelResult) -> float | None:
    """Seconds from the command's start to the model's verdict (the sweep records it); None when
    the model was never judged."""
    return result.time_to_verdict_s


def throughput_label(results: list[ModelResult]) -> str:
    """tokens/s per GPU on GPUs; on CPU a rank is a process, not a GPU."""
    return "tokens/s per GPU" if any(r.gpu for r in results) else "tokens/s per rank"


def _num(value, spec: str = ".4f", default: str = "-") -> str:
    if value is None:
        return default
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


# ---- junit.xml


def junit_xml(results: list[ModelResult], summary: dict) -> str:
    """One testsuite, one testcase per model asked for. FAIL (and any verdict but PASS) is a failure
    whose message is the first reason and whose text is all of them; INTERRUPTED and NOT RUN are
    skipped with their reason. A testcase's time is the model's own job's; the
    time to verdict from the command's start is a property, as in summary.md."""
    skipped = sum(1 for r in results if r.verdict in NOT_JUDGED)
    failures = sum(1 for r in results if r.verdict != PASS) - skipped
    total_time = sum(_case_time(r) for r in results)
    suites = ET.Element(
        "testsuites",
        name=JUNIT_CLASSNAME,
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{total_time:.3f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"{JUNIT_CLASSNAME}.{summary.get('run_id', 'run')}",
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{total_time:.3f}",
    )
    suite_props = ET.SubElement(suite, "properties")
    for key in ("run_id", "mode", "command", "exit_code"):
        if summary.get(key) is not None:
            ET.SubElement(suite_props, "property", name=key, value=str(summary[key]))
    for result in results:
        case = ET.SubElement(
            suite, "testcase", classname=JUNIT_CLASSNAME, name=str(result.model), time=f"{_case_time(result):.3f}"
        )
        props = ET.SubElement(case, "properties")
        for key, value in _case_properties(result).items():
            ET.SubElement(props, "property", name=key, value=value)
        verdict = result.verdict
        reasons = [str(reason) for reason in result.reasons] or [f"verdict is {verdict}, not PASS"]
        if verdict in NOT_JUDGED:
            ET.SubElement(case, "skipped", message=f"{verdict}: {reasons[0]}")
        elif verdict != PASS:
            failure = ET.SubElement(case, "failure", message=reasons[0], type=str(verdict or FAIL))
            failure.text = "\n".join(reasons)
        ET.SubElement(case, "system-out").text = "\n".join(f"{k}: {v}" for k, v in _case_properties(result).items())
        if verdict != PASS and result.log_tail:
            ET.SubElement(case, "system-err").text = "\n".join(str(line) for line in result.log_tail)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _case_time(result: ModelResult) -> float:
    times = result.time_s
    for value in (times.total, times.wall):
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return 0.0


def _case_properties(result: ModelResult) -> dict[str, str]:
    return {
        "verdict": str(result.verdict),
        "load_path": str(result.load_path),
        "expected_load_path": str(result.expected_load_path),
        "weights": str(result.weights),
        "initial_loss": _num(result.initial_loss, ".6f", "None"),
        "final_loss": _num(result.final_loss, ".6f", "None"),
        "loss_threshold": str(result.loss_threshold),
        "steps": str(result.steps),
        "time_to_verdict_s": _num(time_to_verdict(result), ".1f", "None"),
    }


# ---- summary.md

SUMMARY_COLUMNS = [
    "model",
    "load path",
    "expected",
    "weights",
    "ranks",
    "initial loss",
    "final loss",
    "replies reproduced",
    "steps",
    "tokens/s per GPU",
    "MFU",
    "peak GiB",
    "time to verdict (from command start)",
    "verdict",
]


def summary_markdown(results: list[ModelResult], summary: dict) -> str:
    lines = [f"# SFT validation run {summary.get('run_id', '')}".rstrip(), ""]
    for key, label in (("mode", "mode"), ("command", "command"), ("exit_code", "exit code")):
        if summary.get(key) is not None:
            value = summary[key]
            lines.append(f"- {label}: `{value}`" if key == "command" else f"- {label}: {value}")
    counts = {v: sum(1 for r in results if r.verdict == v) for v in (PASS, FAIL, *NOT_JUDGED)}
    lines += [
        f"- models: {len(results)}, " + ", ".join(f"{v} {n}" for v, n in counts.items() if n or v in (PASS, FAIL)),
        "",
    ]
    columns = [throughput_label(results) if c == "tokens/s per GPU" else c for c in SUMMARY_COLUMNS]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in SUMMARY_COLUMNS) + "|")
    for r in results:
        mfu = r.mfu
        row = [
            r.model,
            r.load_path,
            r.expected_load_path or "-",
            r.weights or "-",
            r.world_size if r.world_size is not None else "-",
            _num(r.initial_loss),
            _num(r.final_loss),
            replies_reproduced(r.generation),
            r.steps,
            _num(r.tokens_per_s_per_gpu, ",.0f"),
            "-" if mfu is None else _num(100 * mfu, ".1f") + "%",
            _num(r.peak_mem_gib, ".2f"),
            "-" if time_to_verdict(r) is None else _num(time_to_verdict(r), ".1f") + " s",
            f"**{r.verdict}**",
        ]
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    lines += ["", "## Reasons", ""]
    failing = [r for r in results if r.verdict != PASS]
    if not failing:
        lines.append("Every model passed.")
    for r in failing:
        lines.append(f"### {r.model} ({r.verdict})")
        lines.append("")
        lines += [f"- {_md_text(reason)}" for reason in r.reasons or ["(no reason recorded)"]]
        lines.append("")
    lines += generation_markdown(results)
    return "\n".join(lines).rstrip() + "\n"


def replies_reproduced(check) -> str:
    """The generation check in one cell: exact replies of those decoded, and the token accuracy."""
    if check is None:
        return "-"
    return f"{check.exact_matches}/{check.samples} ({check.token_accuracy:.1%} of tokens)"


def generation_markdown(results: list[ModelResult]) -> list[str]:
    """Each model's generation check with its worst mismatches (expected vs got, decoded)."""
    checked = [r for r in results if r.generation is not None]
    if not checked:
        return []
    lines = [
        "## Generation check",
        "",
        "Greedy decoding with the KV cache from the prompts of training samples, after training "
        "(harness/job/generation.py).",
        "",
    ]
    for r in checked:
        check = r.generation
        lines.append(
            f"- {r.model}: {check.exact_matches}/{check.samples} replies exact, {check.token_accuracy:.1%} of "
            f"{check.expected_tokens} tokens, {check.no_end_of_turn} without end-of-turn, "
            f"{check.prompts_unlike_training} prompts unlike training's"
        )
        for worst in check.worst:
            lines.append(
                f"  - sample {worst.sample} ({worst.token_accuracy:.0%} of tokens): "
                f"prompt ...{_md_text(repr(worst.prompt[-60:]))}, "
                f"expected {_md_text(repr(worst.expected))}, got {_md_text(repr(worst.got))}"
            )
    return lines + [""]


def _md_cell(value) -> str:
    return _md_text(value).replace("|", "\\|")


def _md_text(value) -> str:
    return " ".join(str(value).split())


# ---- loss_curves.png


def loss_curves(run_dir: Path, results: list[ModelResult]) -> tuple[list[tuple[str, list, list]], list[float]]:
    """(label, steps, losses) per model, in order, and the distinct loss thresholds. A model with no
    plottable step keeps its place in the legend as "<model> (no steps)". Losses that are not finite
    or not positive cannot sit on a log axis and are left out."""

    curves, thresholds = [], {}
    for result in results:
        name = str(result.model)
        rows = read_metrics(metrics_path(run_dir, result))
        points = [
            (m.step, m.loss) for m in rows if isinstance(m.loss, (int, float)) and math.isfinite(m.loss) and m.loss > 0
        ]
        if points:
            steps, losses = (list(v) for v in zip(*points))
            curves.append((f"{name} ({result.verdict})", steps, losses))
        else:
            curves.append((f"{name} (no steps)", [], []))
        threshold = result.loss_threshold
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold > 0:
            thresholds.setdefault(float(threshold), None)
    return curves, list(thresholds)


def loss_curves_png(run_dir: Path, results: list[ModelResult], title: str = "Loss") -> bytes:
    """One loss curve per model (log y), a dashed line per distinct loss threshold; PNG bytes.
    Uses matplotlib's object API with the Agg canvas: no pyplot, no global backend change."""

    curves, thresholds = loss_curves(run_dir, results)
    fig = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, steps, losses in curves:
        ax.plot(steps, losses, linewidth=1.3, label=label)
    for threshold in thresholds:
        ax.axhline(threshold, linestyle="--", color="0.35", linewidth=1.0, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    if not thresholds and not any(steps for _, steps, _ in curves):
        ax.set_ylim(1e-2, 1e1)  # nothing to scale to: a sane empty log axis
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
