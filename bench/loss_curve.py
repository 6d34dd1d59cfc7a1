"""Plot the training log of bench/train_tiny.py: each stage's loss against its step.

    python bench/loss_curve.py bench/tiny_trained/train_log.csv docs/img/tiny_loss.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

LABELS = {"vae": "VAE: L1 reconstruction (+1e-6 KL)", "unet": "UNet: epsilon MSE"}


def read_log(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """(steps, losses) per stage, in the log's order."""
    stages: dict[str, tuple[list[int], list[float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            steps, losses = stages.setdefault(row["stage"], ([], []))
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return stages


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` logged points: single steps' losses are noisy."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(stages: dict[str, tuple[list[int], list[float]]], out: Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, (stage, (steps, losses)) in zip(axes[0], stages.items()):
        ax.plot(steps, losses, alpha=0.35, lw=0.8, label="logged step")
        ax.plot(steps, smooth(losses, window), lw=1.8, label=f"mean of {window} logged steps")
        ax.set_title(LABELS.get(stage, stage))
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    plot(read_log(args.log), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
