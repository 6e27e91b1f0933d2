"""Statistics over seeds for `mlaan bench accuracy`: mean ± std per method, paired differences, banded curves.

A comparison of two methods is *paired*: for every seed both finished, the difference of their final test
errors (the same seed gives both the same data order, crops and flips, and — for the modules they share — the
same initial weights), then the mean and sample standard deviation of those differences. With few seeds this is
a far tighter estimate of a gap than the difference of two means, and it is what the table reports.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from . import common


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation); std is None below two values, both None for no value."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) >= 2 else None)


def paired_difference(errors: dict[int, float], reference: dict[int, float]) -> dict:
    """Per seed ``errors[s] − reference[s]`` over the seeds both hold: {"seeds", "values", "mean", "std"}."""
    seeds = sorted(set(errors) & set(reference))
    values = [errors[s] - reference[s] for s in seeds]
    mean, std = mean_std(values)
    return {"seeds": seeds, "values": values, "mean": mean, "std": std}


def summarise(runs: list[dict]) -> list[dict]:
    """One entry per arm (``label``, in first-seen order) from finished runs (``report.load_run`` dicts with a
    ``seed``, and ``label``/``variant`` for variants): final test errors per seed, mean ± std, and paired Δ vs
    BP (``vs_bp``: the plain run of the first end-to-end method), vs the base method (``dgl`` for ``dgl+mlaan``)
    and, for a variant, vs its plain method."""
    errors: dict[str, dict[int, float]] = {}
    methods: dict[str, tuple[str, str]] = {}
    for run in runs:
        if run["finished"] and run["test_error"] is not None:
            label = run.get("label", run["method"])
            errors.setdefault(label, {})[int(run["seed"])] = float(run["test_error"])
            methods[label] = (run["method"], run.get("variant", ""))
    bp = next((label for label, (method, variant) in methods.items() if not variant and common.end_to_end(method)),
              None)
    out = []
    for label, per_seed in errors.items():
        method, variant = methods[label]
        mean, std = mean_std(list(per_seed.values()))
        base, _, suffix = method.partition("+")

        def versus(other: str | None, per_seed: dict = per_seed, label: str = label) -> dict | None:
            return paired_difference(per_seed, errors[other]) if other in errors and other != label else None

        entry = {"label": label, "method": method, "variant": variant, "seeds": sorted(per_seed),
                 "errors": per_seed, "mean": mean, "std": std, "vs_bp": versus(bp),
                 "vs_base": versus(base) if suffix else None, "vs_plain": versus(method) if variant else None}
        out.append(entry)
    return out


def _pp(value: float | None, std: float | None = None, sign: bool = False) -> str:
    """Percentage points: ``12.34 ± 0.56`` (or ``+1.20 ± 0.30`` with ``sign``)."""
    if value is None:
        return "—"
    text = f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"
    return text + (f" ± {100 * std:.2f}" if std is not None else "")


def _delta(d: dict | None) -> str:
    if d is None or not d["seeds"]:
        return "—"
    return f"{_pp(d['mean'], d['std'], sign=True)} (n={len(d['seeds'])})"


def table(summary: list[dict]) -> str:
    """Markdown: error mean ± std, each seed's error, paired Δ vs BP and vs the base method (pp)."""
    rows = []
    variants = any(e["variant"] for e in summary)
    for e in summary:
        per_seed = ", ".join(f"s{s}: {100 * e['errors'][s]:.2f}" for s in e["seeds"])
        row = [e["label"], len(e["seeds"]), _pp(e["mean"], e["std"]), per_seed, _delta(e["vs_bp"]),
               _delta(e["vs_base"])]
        rows.append(row + ([_delta(e["vs_plain"])] if variants else []))
    headers = ["method", "seeds", "test error % (mean ± std)", "per seed", "Δ vs BP (pp, paired)",
               "Δ vs base (pp, paired)"]
    return common.format_table(headers + (["Δ vs plain method (pp, paired)"] if variants else []), rows)


def per_epoch(run: dict, key: str, complete_only: bool = False) -> dict[int, float]:
    """Epoch → ``key`` in ``run``'s last line for that epoch (a resumed run may log an epoch twice; the later line
    covers it), lines without it left out; ``complete_only``: those of an epoch cut off mid-way left out too."""
    return {int(line["epoch"]): float(line[key]) for line in run.get("epochs") or []
            if line.get(key) is not None and line.get("epoch") is not None
            and (line.get("complete", True) or not complete_only)}


def interim(runs: list[dict]) -> list[dict]:
    """Where each unfinished run stands: its last complete epoch's test error against the same-seed finished runs
    of the other arms *at that epoch* — the same recipe, so the same point of the learning-rate schedule, which
    makes the epoch-for-epoch comparison fair while the run is still going (an interim reading; a run's final
    error is the result). One entry per unfinished run with a complete epoch: ``label``, ``seed``, ``epoch``,
    ``test_error`` and ``versus`` ({finished label: its test error at that epoch}, arms that logged it)."""
    finished = [(r, per_epoch(r, "test_error", complete_only=True)) for r in runs if r["finished"]]
    out = []
    for run in runs:
        mine = per_epoch(run, "test_error", complete_only=True)
        if run["finished"] or not mine:
            continue
        epoch = max(mine)
        versus = {other.get("label", other["method"]): theirs[epoch] for other, theirs in finished
                  if int(other["seed"]) == int(run["seed"]) and epoch in theirs}
        out.append({"label": run.get("label", run["method"]), "seed": int(run["seed"]), "epoch": epoch,
                    "test_error": mine[epoch], "versus": versus})
    return out


def interim_table(entries: list[dict]) -> str:
    """Markdown of :func:`interim`: per unfinished run, its epoch and test error, and each finished arm's error at
    that epoch with the difference (pp; negative: the unfinished run is ahead). Empty for no entry."""
    if not entries:
        return ""
    labels = list(dict.fromkeys(label for e in entries for label in e["versus"]))
    rows = [[e["label"], e["seed"], e["epoch"], _pp(e["test_error"])]
            + [f"{_pp(e['versus'][label])} ({_pp(e['test_error'] - e['versus'][label], sign=True)})"
               if label in e["versus"] else "—" for label in labels] for e in entries]
    return common.format_table(["unfinished run", "seed", "epoch", "test error %",
                                *(f"{label} at that epoch (Δ)" for label in labels)], rows)


def epoch_band(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch over the runs that reached it: (epochs, mean, min, max) of ``key`` in their last line for that
    epoch (a resumed run may log an epoch twice; the later line covers it)."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for epoch, value in per_epoch(run, key).items():
            by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    return (epochs, [statistics.fmean(by_epoch[e]) for e in epochs], [min(by_epoch[e]) for e in epochs],
            [max(by_epoch[e]) for e in epochs])


def main_path(own: Sequence[float | None], cascaded: Sequence[float | None] | None) -> list[float | None]:
    """Per module, the value of the aux net that trains it: its own (independent) one, or under MLM (``cascaded``
    has a value) the cascaded one. Under MLM the first module has no cascade of its own and its independent aux
    net is weighted w_ind (0.001 by default: it stays near chance): it learns through the second module's
    cascade, so its entry is None rather than a chance-level figure that would read as a lagging module. The
    last module's entry is the network itself on either path (METHOD.md §3)."""
    if not cascaded or all(c is None for c in cascaded[:-1]):  # no MLM (`mlaan eval` gives the network as both
        return list(own)                                          # paths of the last module)
    last = len(own) - 1
    return [c if c is not None else (o if j == last else None) for j, (o, c) in enumerate(zip(own, cascaded))]


def main_aux_losses(line: dict) -> list[float | None] | None:
    """:func:`main_path` of the per-module training losses in one ``metrics.jsonl`` line."""
    own = line.get("train_independent_losses")
    return main_path(own, line.get("train_cascaded_losses")) if own else None


def module_losses(runs: list[dict]) -> list[float] | None:
    """Mean over runs of the last epoch's :func:`main_aux_losses` (None entries skipped)."""
    lists = [main_aux_losses(run["epochs"][-1]) for run in runs if run["epochs"]]
    lists = [values for values in lists if values]
    if not lists:
        return None
    width = min(len(v) for v in lists)
    means = (_mean_or_none([v[j] for v in lists]) for j in range(width))
    return [math.nan if m is None else m for m in means]


def main_module_accuracies(run: dict) -> list[float | None] | None:
    """:func:`main_path` of the per-module test accuracies in ``run["module_accuracies"]`` (from `mlaan eval
    --modules`); the last entry is the network itself."""
    measured = run.get("module_accuracies")
    if not measured or not measured.get("independent"):
        return None
    return main_path(measured["independent"], measured.get("cascaded"))


def module_accuracy_means(runs: list[dict]) -> dict[str, list[float | None]]:
    """Label → :func:`main_module_accuracies` averaged over its runs that have them (equal lengths only; None
    where a module has no aux net of its own that trains it)."""
    by_label: dict[str, list[list[float | None]]] = {}
    for run in runs:
        values = main_module_accuracies(run)
        if values is not None:
            by_label.setdefault(run.get("label", run["method"]), []).append(values)
    return {label: [_mean_or_none(column) for column in zip(*lists)]
            for label, lists in by_label.items() if len({len(v) for v in lists}) == 1}


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def module_table(runs: list[dict]) -> str:
    """A markdown table of :func:`module_accuracy_means` in %, one row per method, one column per module; an
    end-to-end method's one value (its network) under the last module. Empty string when nothing was measured."""
    means = module_accuracy_means(runs)
    if not means:
        return ""
    width = max(len(v) for v in means.values())
    rows = []
    for label, values in means.items():
        cells = ["—" if v is None else f"{100 * v:.1f}" for v in values]
        rows.append([label, *([""] * (width - len(cells))), *cells])  # end-to-end: its network under the last
    return common.format_table(["method", *(str(j) for j in range(1, width + 1))], rows)


def plot(runs: list[dict], path: Path, title: str = "") -> None:
    """Test error per epoch (mean over seeds, band = min to max) and each local module's main aux loss (the
    cascaded one under MLM) at the last epoch (mean over seeds), one colour per method; with measured per-module
    test accuracies (``--modules``) a third panel of them, an end-to-end method as a dashed line."""
    plt = common.pyplot()
    accuracies = module_accuracy_means(runs)
    fig, axes = plt.subplots(1, 3 if accuracies else 2, figsize=(19.5 if accuracies else 13, 4.8))
    ax_err, ax_mod = axes[0], axes[1]
    labels = list(dict.fromkeys(r.get("label", r["method"]) for r in runs))
    for i, method in enumerate(labels):
        group = [r for r in runs if r.get("label", r["method"]) == method]
        color = common.method_color(method, i)
        epochs, mean, low, high = epoch_band(group, "test_error")
        if epochs:
            label = f"{method} ({len(group)} seed{'s' if len(group) > 1 else ''})"
            ax_err.plot(epochs, [100 * v for v in mean], color=color, label=label, marker="o", markersize=3)
            if len(group) > 1:
                ax_err.fill_between(epochs, [100 * v for v in low], [100 * v for v in high], color=color, alpha=0.2)
        losses = module_losses(group)
        if losses:
            _per_module(ax_mod, losses, color, method)
        if method in accuracies:
            _per_module(axes[2], [math.nan if v is None else 100 * v for v in accuracies[method]], color, method)
    panels = [
        (ax_err, "epoch", "test error (%)", "test error per epoch (mean over seeds, band: min–max)"),
        (ax_mod, "local module", "training loss of its main aux net (last epoch)",
         "where the gap comes from: per-module aux loss"),
    ]
    if accuracies:
        panels.append((axes[2], "local module", "test accuracy of its main aux net (%)",
                       "per-module test accuracy (mean over seeds)"))
    for ax in axes:  # whole epochs (epoch_band's) and module indices: no tick between two of them
        common.integer_ticks(ax.xaxis)
    common.save_panels(fig, panels, path, title)


def _per_module(ax, values: list[float], color: str, method: str) -> None:
    """One method's per-module values on ``ax``; an end-to-end method has one module, the network, drawn as a
    dashed reference line across the local modules of the others."""
    if len(values) == 1:
        ax.axhline(values[0], color=color, linestyle="--", label=f"{method} (network)")
    else:
        ax.plot(range(1, len(values) + 1), values, color=color, label=method, marker="o", markersize=3)
