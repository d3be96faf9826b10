"""PNG overlays of predictions on validation slices, for a quick look at a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cluster.atomic import atomic_path

CLASS_COLOURS = ["#00000000", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e"]


def save_overlay(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray,
                 class_names: list[str]) -> None:
    """Image with ground-truth and predicted label contours side by side."""
    figure, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    panels = ((axes[0], truth, "ground truth"), (axes[1], prediction, "prediction"))
    for ax, labels, title in panels:
        ax.imshow(image, cmap="gray")
        for class_id in range(1, len(class_names)):
            if (labels == class_id).any():
                ax.contour(labels == class_id, levels=[0.5],
                           colors=[CLASS_COLOURS[class_id % len(CLASS_COLOURS)]], linewidths=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
