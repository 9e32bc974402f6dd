"""The markdown section and the plots of a from-scratch study, from its JSON results."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.sections import OWNED_SECTIONS

from .removal import COLLAPSED_BELOW, RULES
from .runner import CONFIG_FILE

__all__ = ["load_results", "section", "section_markers", "write_plots"]


def section_markers(name: str) -> tuple[str, str]:
    """The begin and end markers of the study's section of RESULTS.md (listed in benchmarks.sections)."""
    return next((b, e) for b, e in OWNED_SECTIONS if b.startswith(f"<!-- scratch-{name}:begin"))


def load_results(out_dir: Path) -> tuple[dict, list[dict]]:
    """The study recorded in `out_dir` and its results, in arm order then seed order."""
    study = json.loads((Path(out_dir) / CONFIG_FILE).read_text())["study"]
    results = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*/seed*.json"))]
    return study, results


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _pm(values: list[float], digits: int, scale: float = 1.0, suffix: str = "") -> str:
    mean, se = _stats([v * scale for v in values])
    return f"{mean:.{digits}f}{suffix}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def _by_arm(results: list[dict], arm_names: list[str]) -> dict[str, list[dict]]:
    grouped = {name: [r for r in results if r["arm"] == name] for name in arm_names}
    return {name: sorted(rows, key=lambda r: r["seed"]) for name, rows in grouped.items() if rows}


def _cost_text(study: dict) -> tuple[float, int, str]:
    """Scale, digits and unit of a removal cost: % of perplexity (decoder) or accuracy points (vision)."""
    return (100.0, 1, " %") if study["kind"] == "decoder" else (100.0, 1, " pt")


def _main_table(study: dict, arms: dict[str, list[dict]]) -> list[str]:
    scale, digits, unit = _cost_text(study)
    metric = next(iter(arms.values()))[0]["metric"]
    mdig = 2 if metric == "perplexity" else 3
    ks = study["ks"]
    head = (f"| arm | seeds | final train loss (change over the last fifth) | full-depth test {metric} | collapsed layers | "
            "removable (chosen on validation) | "
            + " | ".join(f"test cost at k = {k}" for k in ks) + " | "
            + " | ".join(f"k = {k}: test {metric} − vanilla's" for k in ks) + " |")
    lines = [head, "|" + "---|" * (6 + 2 * len(ks))]
    vanilla = {r["seed"]: r for r in arms.get("vanilla", [])}
    for name, rows in arms.items():
        loss = [r["curves"]["loss"] for r in rows]
        plateau = f"{_pm([c[-1] for c in loss], 3)} ({_pm([c[-1] - c[(4 * len(c)) // 5 - 1] for c in loss], 3)})"
        cells = [name, str(len(rows)), plateau, _pm([r["full"]["test"] for r in rows], mdig),
                 _pm([len(r["collapsed_layers"]) for r in rows], 1), _pm([r["chosen"]["tolerance"]["removable"] for r in rows], 1)]
        cells += [_pm([r["chosen"]["by_k"][str(k)]["test_cost"] for r in rows], digits, scale, unit) for k in ks]
        for k in ks:
            paired = [r["chosen"]["by_k"][str(k)]["test"] - vanilla[r["seed"]]["chosen"]["by_k"][str(k)]["test"]
                      for r in rows if r["seed"] in vanilla]
            cells.append("—" if name == "vanilla" or not paired else _pm(paired, mdig))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rule_table(study: dict, arms: dict[str, list[dict]]) -> list[str]:
    scale, digits, unit = _cost_text(study)
    ks = study["ks"]
    lines = ["| arm | rule | removable (validation) | " + " | ".join(f"test cost at k = {k}" for k in ks) + " |",
             "|" + "---|" * (3 + len(ks))]
    for name, rows in arms.items():
        for rule in RULES:
            cells = [name, rule, _pm([r["rules"][rule]["removable"] for r in rows], 1)]
            cells += [_pm([r["rules"][rule]["by_k"][k - 1]["test_cost"] for r in rows], digits, scale, unit) for k in ks]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _distance_table(arms: dict[str, list[dict]]) -> list[str]:
    layers = len(next(iter(arms.values()))[0]["scores"]["msw_relative"])
    lines = ["| arm | " + " | ".join(f"layer {i}" for i in range(layers)) + " | logged distance, last / first (mean over layers) |",
             "|" + "---|" * (layers + 2)]
    for name, rows in arms.items():
        cells = [name] + [_pm([r["scores"]["msw_relative"][i] for r in rows], 3) for i in range(layers)]
        ratios = []
        for r in rows:
            curve = r["curves"]["msw"]
            if curve:
                ratios.append(sum(b / a for a, b in zip(curve[0], curve[-1]) if a > 0) / len(curve[0]))
        cells.append(_pm(ratios, 3) if ratios else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _collapse_sentence(arms: dict[str, list[dict]]) -> str:
    runs = [(name, r) for name, rows in arms.items() for r in rows]
    hits = [(name, r["seed"], r["collapsed_layers"]) for name, r in runs if r["collapsed_layers"]]
    if not hits:
        return f"**No layer collapsed** (relative MSW under {COLLAPSED_BELOW:g}) in any of the {len(runs)} runs."
    listed = "; ".join(f"{name} seed {seed}: layers {layers}" for name, seed, layers in hits)
    return f"Layers collapsed (relative MSW under {COLLAPSED_BELOW:g}) in {len(hits)} of {len(runs)} runs: {listed}."


def section(study: dict, results: list[dict], plots: list[Path], link_prefix: str, arm_names: list[str]) -> str:
    """The RESULTS.md section of one study, between its markers."""
    begin, end = section_markers(study["name"])
    arms = _by_arm(results, arm_names)
    seconds = sum(r["seconds"] for r in results)
    scale, digits, unit = _cost_text(study)
    tolerance = f"{study['tolerance'] * scale:g}{unit}"
    model = ", ".join(f"{k} {v}" for k, v in study["model"].items())
    lines = [
        begin,
        f"## From random initialisation: {study['name']}{' (QUICK smoke run: says nothing about quality)' if study['quick'] else ''}",
        "",
        f"`python -m benchmarks.scratch {study['name']}`: {study['notes']}. Model: {model}. Budget, equal for every "
        f"arm: {study['steps']} optimizer steps × {study['batch_size']} examples (AdamW, lr {study['learning_rate']:g}, "
        f"{study['warmup_steps']} warm-up steps, cosine decay); seeds {', '.join(map(str, sorted({r['seed'] for r in results})))}; "
        f"{seconds / 60:.1f} min in all (training and measurement, one process). Layers are removed **without any "
        "fine-tuning** (the paper's protocol) by each rule (MSW ranking, Block Influence, angular distance, the last "
        "layers before the final one, greedy measurement on validation); the rule at each k, and the number of layers "
        f"removable within the tolerance ({tolerance} on validation, the paper's loop), are chosen on "
        f"{study['validation_rows']} validation rows; costs are reported on {study['test_rows']} test rows. "
        f"A layer counts as collapsed when its final MSW relative to its input's RMS is under {COLLAPSED_BELOW:g}. "
        f"Costs are {'relative perplexity increases' if study['kind'] == 'decoder' else 'accuracy drops'} against the "
        "same model at full depth (negative: removal helped); the last columns compare the metric after removal with "
        f"vanilla's at the same seed and k ({'lower' if study['kind'] == 'decoder' else 'higher'} is better); "
        "± is one standard error over seeds.",
        "",
        *_main_table(study, arms),
        "",
        _collapse_sentence(arms),
        "",
        "Every rule on its own (mean over seeds; the rule is not chosen here):",
        "",
        *_rule_table(study, arms),
        "",
        "Final per-layer MSW relative to the layer input's RMS (calibration rows, refined directions), and the logged "
        "training distance at the end over the start (each arm logs its own estimator: raw, relative or random):",
        "",
        *_distance_table(arms),
        "",
        " ".join(f"![{p.stem}]({link_prefix}/{p.name})" for p in plots),
        end,
    ]
    return "\n".join(lines) + "\n"


def write_plots(study: dict, results: list[dict], plot_dir: Path, arm_names: list[str]) -> list[Path]:
    """Removal cost against k per arm, and the per-layer distance curves over training per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _by_arm(results, arm_names)
    plot_dir.mkdir(parents=True, exist_ok=True)
    scale, _, unit = _cost_text(study)
    layers = study["model"]["num_hidden_layers"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in arms.items():
        ks = list(range(1, layers))
        means = [_stats([r["chosen"]["by_k"][str(k)]["test_cost"] * scale for r in rows])[0] for k in ks]
        ax.plot(ks, means, marker="o", label=name)
    ax.axhline(study["tolerance"] * scale, color="grey", linestyle=":", label="tolerance")
    ax.set_xticks(list(range(1, layers)))
    ax.set(xlabel="layers removed (k), no fine-tuning", ylabel=f"test cost ({unit.strip()})", title=f"{study['name']}: removal cost (rule chosen on validation)")
    ax.legend(fontsize=7)
    cost = plot_dir / f"scratch_{study['name']}_removal.png"
    fig.tight_layout(), fig.savefig(cost, dpi=100), plt.close(fig)

    columns = 3
    nrows = math.ceil(len(arms) / columns)
    # one log scale for every panel, so that the arms compare at a glance (rms_* logs relative distances)
    fig, axes = plt.subplots(nrows, columns, figsize=(4 * columns, 3 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(arms):]:
        ax.set_visible(False)
    for ax, (name, rows) in zip(axes.flat, arms.items()):
        steps = rows[0]["curves"]["steps"]
        for i in range(layers):
            values = [_stats([r["curves"]["msw"][j][i] for r in rows])[0] for j in range(len(steps))]
            ax.plot(steps, values, label=f"layer {i}")
        ax.set_yscale("log"), ax.set_title(name, fontsize=8), ax.set_xlabel("step")
    for row in axes:
        row[0].set_ylabel("logged MSW (mean over seeds)")
    axes[0][0].legend(fontsize=6)
    curves = plot_dir / f"scratch_{study['name']}_distances.png"
    fig.tight_layout(), fig.savefig(curves, dpi=100), plt.close(fig)
    return [cost, curves]
