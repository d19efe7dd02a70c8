"""Accuracy / length metrics and reports in the IAPO paper's layout (DESIGN section 7).

Inputs are per-problem sample matrices: `correct` (num_problems, num_samples) bool and `lengths`
(num_problems, num_samples) completion tokens, sample j of every problem drawn j-th.

    P@k    fraction of problems with a correct answer among the FIRST k samples (what the paper reports)
    pass@k unbiased estimator 1 - C(n-c, k) / C(n, k), averaged over problems (lower variance)
    L@k    mean completion tokens over the first k samples of every problem
    R@k    P@k / L@k, accuracy per token (NaN when L@k is 0)

k must satisfy 1 <= k <= num_samples everywhere: a k beyond the samples drawn would silently
report P@n under the name P@k, so it raises ValueError instead of being skipped.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

TABLE_METRICS = ("P", "L", "R")  # the paper's table columns per k


def _as_correct(correct) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"correct: got shape {arr.shape}, expected a non-empty (num_problems, num_samples) matrix")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"correct: got dtype {arr.dtype} with values other than 0/1, expected booleans")
        arr = arr.astype(bool)
    return arr


def _as_lengths(lengths) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"lengths: got shape {arr.shape}, expected a non-empty (num_problems, num_samples) matrix")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"lengths: got dtype {arr.dtype}, expected numeric token counts")
    bad = arr[~(np.isfinite(arr) & (arr >= 0))]
    if bad.size:
        raise ValueError(f"lengths: got {bad[0].item()!r}, expected finite token counts >= 0")
    return arr.astype(np.float64)


def _check_k(k: int, num_samples: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_samples:
        raise ValueError(f"k: got {k!r}, expected an integer in [1, {num_samples}] (the samples per problem)")


def pass_at_k_first(correct, k: int) -> float:
    """Fraction of problems solved by at least one of their first k samples."""
    arr = _as_correct(correct)
    _check_k(k, arr.shape[1])
    return float(arr[:, :k].any(axis=1).mean())


def pass_at_k_unbiased(correct, k: int) -> float:
    """Mean over problems of 1 - C(n-c, k) / C(n, k), the chance a random k-subset holds a correct one.

    Product form C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), which never forms the
    binomials, so it neither overflows for large n nor loses precision.
    """
    arr = _as_correct(correct)
    n = arr.shape[1]
    _check_k(k, n)
    solved = []
    for c in arr.sum(axis=1):
        if n - c < k:  # every k-subset contains a correct sample
            solved.append(1.0)
        else:
            solved.append(1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1))))
    return float(np.mean(solved))


def length_at_k(lengths, k: int) -> float:
    """Mean completion tokens over the first k samples of every problem."""
    arr = _as_lengths(lengths)
    _check_k(k, arr.shape[1])
    return float(arr[:, :k].mean())


def ratio_at_k(correct, lengths, k: int) -> float:
    """P@k / L@k: accuracy bought per generated token; NaN when no tokens were generated."""
    p, length = pass_at_k_first(correct, k), length_at_k(lengths, k)
    return p / length if length > 0 else math.nan


def evaluate_matrices(correct, lengths, ks: Iterable[int]) -> dict:
    """All metrics for each k, as a flat JSON-ready dict: {"num_problems", "num_samples", "P@k", "pass@k", "L@k", "R@k"}."""
    correct_arr, lengths_arr = _as_correct(correct), _as_lengths(lengths)
    if correct_arr.shape != lengths_arr.shape:
        raise ValueError(f"lengths: got shape {lengths_arr.shape}, expected {correct_arr.shape} like correct")
    ks = list(ks)
    if not ks:
        raise ValueError("ks: got an empty list, expected at least one k")
    num_problems, num_samples = correct_arr.shape
    result: dict = {"num_problems": int(num_problems), "num_samples": int(num_samples)}
    for k in ks:
        result[f"P@{k}"] = pass_at_k_first(correct_arr, k)
        result[f"pass@{k}"] = pass_at_k_unbiased(correct_arr, k)
        result[f"L@{k}"] = length_at_k(lengths_arr, k)
        result[f"R@{k}"] = ratio_at_k(correct_arr, lengths_arr, k)
    return result


def _cell(results: Mapping, method: str, key: str) -> float:
    if key not in results:
        raise ValueError(f"results_by_method[{method!r}]: got no {key!r}, expected evaluate_matrices output for every k")
    return results[key]


FORMATS = {"P": "{:.4f}", "L": "{:.2f}", "R": "{:.2e}"}


def format_cell(metric: str, value: float, std: float | None = None) -> str:
    """P with 4 decimals, L with 2, R in scientific notation; "mean ± std" when a std is given."""
    text = FORMATS[metric].format(value)
    return text if std is None else f"{text} ± {FORMATS[metric].format(std)}"


def to_markdown(results_by_method: Mapping[str, Mapping], ks: Sequence[int]) -> str:
    """The paper's table: one row per method, columns P@k, L@k, R@k for each k.

    P@k with 4 decimals, L@k with 2, R@k in scientific notation (1.16e-02): R@k is ~1e-3..1e-2.
    A result with "P@k std" keys (iapo-eval over several seeds) shows "mean ± std".
    """
    header = ["Method"] + [f"{m}@{k}" for k in ks for m in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for method, results in results_by_method.items():
        cells = [format_cell(m, _cell(results, method, f"{m}@{k}"), results.get(f"{m}@{k} std"))
                 for k in ks for m in TABLE_METRICS]
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(results_by_method: Mapping[str, Mapping], ks: Sequence[int], out_dir: str | Path) -> dict[str, Path]:
    """Write metrics.json, metrics.csv, metrics.md and accuracy_vs_length.png into out_dir.

    Returns {"json", "csv", "md", "png"} -> path. Extra keys in a method's results (e.g. wall-clock
    time) go to JSON and CSV as they are; the Markdown table and plot show P/L/R only.
    """
    markdown = to_markdown(results_by_method, ks)  # validates every (method, k) before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "metrics.json",
        "csv": out / "metrics.csv",
        "md": out / "metrics.md",
        "png": out / "accuracy_vs_length.png",
    }
    paths["json"].write_text(json.dumps({"ks": list(ks), "methods": results_by_method}, indent=2) + "\n")
    paths["md"].write_text(markdown)

    columns: list[str] = []  # scalar values only: per-seed lists and settings stay in the JSON
    for results in results_by_method.values():
        columns += [key for key, value in results.items() if key not in columns and _scalar(value)]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method"] + columns)
        writer.writeheader()
        for method, results in results_by_method.items():
            writer.writerow({"method": method, **{k: v for k, v in results.items() if k in columns}})

    plot_accuracy_vs_length(results_by_method, ks, paths["png"])
    return paths


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def plot_accuracy_vs_length(results_by_method: Mapping[str, Mapping], ks: Sequence[int], path: str | Path,
                            title: str = "Accuracy against length") -> None:
    """P@k against L@k, one line per method, each point labelled with its k (error bars where a
    result has "P@k std" / "L@k std")."""
    # Figure + its own Agg canvas, not pyplot: no global backend switch, safe beside other plotting.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, results in results_by_method.items():
        xs = [results[f"L@{k}"] for k in ks]
        ys = [results[f"P@{k}"] for k in ks]
        xerr = [results.get(f"L@{k} std") or 0.0 for k in ks]
        yerr = [results.get(f"P@{k} std") or 0.0 for k in ks]
        if any(xerr) or any(yerr):
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=method)
        else:
            ax.plot(xs, ys, marker="o", label=method)
        for k, x, y in zip(ks, xs, ys):
            ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("L@k (mean completion tokens)")
    ax.set_ylabel("P@k (first-k accuracy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if results_by_method:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
