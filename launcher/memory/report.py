"""The budget as people read it: tables per rank (ranks with equal columns grouped) and stacked bar plots."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..objectives import sequences_per_sample
from .components import COMPONENTS
from .predict import Budget
from .sizes import BINARY_UNITS, format_bytes, format_count


def rank_groups(columns: list[dict[str, object]]) -> list[tuple[str, int]]:
    """Consecutive ranks with identical columns, as ("rank 0" / "ranks 0-3", first rank index)."""
    groups, start = [], 0
    for i in range(1, len(columns) + 1):
        if i == len(columns) or columns[i] != columns[start]:
            groups.append((f"rank {start}" if i - 1 == start else f"ranks {start}-{i - 1}", start))
            start = i
    return groups


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header] + rows
    ]
    return "\n".join(lines)


def micro_batch(train) -> str:
    """The micro batch as the budget counts it: its samples (a pair is two sequences)."""
    sequences = sequences_per_sample(train)
    if sequences == 1:
        return str(train.micro_batch_size)
    return f"{train.micro_batch_size} ({train.objective}: {sequences * train.micro_batch_size} sequences)"


def render(budget: Budget) -> str:
    h, cfg = budget.hardware, budget.cfg
    summary = (
        f"Memory budget per rank: {cfg.model.path} ({format_count(budget.model_params)} parameters, 4-bit {cfg.quant.type}), "
        f"{budget.strategy} on {h.world_size} rank(s) ({h.nodes} node(s)), micro batch {micro_batch(cfg.train)} x "
        f"{cfg.data.max_seq_len} tokens, checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}, "
        f"mixed precision {budget.mixed_precision}, LoRA r={cfg.lora.r}{'' if cfg.train.offload == 'none' else f', offload {cfg.train.offload}'}"
    )
    columns = [{**r.components, **{f"host {k}": v for k, v in r.host_components.items()}} for r in budget.ranks]
    groups = rank_groups(columns)
    names = [n for n in COMPONENTS if any(c.get(n) for c in columns)]
    rows = [[name] + [format_bytes(columns[i][name]) for _, i in groups] for name in names]
    rows.append(["total (GPU)"] + [format_bytes(budget.ranks[i].total_bytes) for _, i in groups])
    host_names = [n for n in COMPONENTS if any(r.host_components.get(n) for r in budget.ranks)]
    rows += [
        [f"host RAM: {n}"] + [format_bytes(budget.ranks[i].host_components[n]) for _, i in groups] for n in host_names
    ]
    if host_names:
        pinned = [format_bytes(sum(budget.ranks[i].host_components.values())) for _, i in groups]
        rows.append(["host RAM total (pinned)"] + pinned)
    if h.gpu_memory is not None:
        rows.append(["GPU memory"] + [format_bytes(h.gpu_memory)] * len(groups))
        rows.append(["headroom"] + [format_bytes(budget.headroom(budget.ranks[i])) for _, i in groups])
    lines = [summary, "", render_table(["component"] + [g for g, _ in groups], rows)]
    if budget.fits is not None:
        worst = min(budget.ranks, key=lambda r: budget.headroom(r))
        verdict = "FITS" if budget.fits else "DOES NOT FIT"
        lines += [
            "",
            f"{verdict}: the fullest rank ({worst.rank}) needs {format_bytes(worst.total_bytes)} of "
            f"{format_bytes(h.gpu_memory)} ({format_bytes(budget.headroom(worst))} headroom).",
        ]
    return "\n".join(lines)


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ConfigError(
            "Plotting needs matplotlib, which is not installed. Install the `plot` extra: "
            "pip install 'qlora-launcher[plot]' (or pip install matplotlib)."
        ) from error
    return plt


def plot_stacked(path: Path, bars: list[tuple[str, dict[str, int]]], title: str, limit: int | None = None) -> None:
    """Stacked bars (one per label) of component bytes."""
    plt = require_matplotlib()
    tallest = max([sum(b.values()) for _, b in bars] + [limit or 0])
    unit, scale = next(((u, size) for u, size in BINARY_UNITS if tallest >= size), ("B", 1))
    names = [n for n in COMPONENTS if any(b.get(n) for _, b in bars)]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars) + 3), 5))
    bottoms = [0.0] * len(bars)
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        heights = [b.get(name, 0) / scale for _, b in bars]
        ax.bar(range(len(bars)), heights, bottom=bottoms, label=name, color=colors[i % len(colors)])
        bottoms = [x + y for x, y in zip(bottoms, heights, strict=True)]
    if limit is not None:
        ax.axhline(limit / scale, color="black", linestyle="--", label="GPU memory")
    ax.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=30 if len(bars) > 6 else 0)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(budget: Budget, path: Path) -> None:
    plot_stacked(
        path,
        [(f"rank {r.rank}", r.components) for r in budget.ranks],
        f"{budget.cfg.model.path}: {budget.strategy}, {budget.hardware.world_size} rank(s), "
        f"{budget.cfg.train.micro_batch_size}x{budget.cfg.data.max_seq_len} tokens",
        budget.hardware.gpu_memory,
    )
