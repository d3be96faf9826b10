"""The report's qualitative grid: a few test slices, their ground truth, and each
initialisation's prediction at the smallest label budget, where they differ most.

Each initialisation is represented by its run of the lowest seed at that budget (its
best-validation weights, ``best.safetensors``); the slices are the test slices with the
most foreground, so every class shows.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import safetensors.torch
import torch

from cluster.storage import is_url, join
from cluster.storage.objects import exists, read_bytes
from data_prep.labeled_slices import load_slices
from data_prep.manifest import MANIFEST_NAME
from finetune.device_data import DeviceSlices
from finetune.model import build_unet
from finetune.overlays import CLASS_COLOURS
from finetune.report_figures import Palette, save
from finetune.run_metrics import RunMetrics
from finetune.train import BEST_WEIGHTS, predict


def overlay_grid(metrics: list[RunMetrics], palette: Palette, path: Path,
                 slices: int = 4) -> Path | None:
    """Write the grid; None (nothing written) when the dataset or weights are gone."""
    lowest = min(run.budget for run in metrics)
    chosen: dict[str, RunMetrics] = {}
    for run in sorted(metrics, key=lambda r: r.seed):
        if run.budget == lowest:
            chosen.setdefault(run.init, run)
    inits = [init for init in palette.order if init in chosen]
    data = chosen[inits[0]].config["data"]
    if not _dataset_here(data) or not all(
            _exists(join(chosen[i].run_dir, BEST_WEIGHTS)) for i in inits):
        return None
    test = load_slices(data, "test")
    picked = _most_foreground(test.masks, test.volumes, slices)
    class_names = chosen[inits[0]].class_names
    predictions = {init: _predict(chosen[init], test.images[picked], len(class_names) + 1)
                   for init in inits}
    columns = 2 + len(inits)
    figure, axes = plt.subplots(len(picked), columns, figsize=(2.2 * columns,
                                                               2.3 * len(picked)),
                                squeeze=False)
    for row, index in enumerate(picked.tolist()):
        image = test.images[index, 0].numpy()
        panels = [("image", None), ("ground truth", test.masks[index].numpy())]
        panels += [(f"{init} (seed {chosen[init].seed})", predictions[init][row].numpy())
                   for init in inits]
        for ax, (title, labels) in zip(axes[row], panels):
            ax.imshow(image, cmap="gray")
            if labels is not None:
                _contours(ax, labels, len(class_names) + 1)
            if row == 0:
                colour = palette.colour(title.split(" (")[0]) if title.split(" (")[0] in \
                    palette.order else "black"
                ax.set_title(title, fontsize=8, color=colour)
            ax.axis("off")
        axes[row][0].text(-0.05, 0.5, test.volumes[index], transform=axes[row][0].transAxes,
                          rotation=90, ha="right", va="center", fontsize=7)
    handles = [plt.Line2D([], [], color=CLASS_COLOURS[k % len(CLASS_COLOURS)], label=name)
               for k, name in enumerate(class_names, start=1)]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    figure.suptitle(f"Test slices at the smallest budget ({lowest}): predictions per "
                    "initialisation", fontsize=10)
    return save(figure, path, rect=(0, 0.04, 1, 1))


def _dataset_here(data: str) -> bool:
    """Whether the runs' dataset is still where they read it (a store may be unreachable)."""
    return Path(data).is_dir() if not is_url(data) else _exists(join(data, MANIFEST_NAME))


def _exists(location: str) -> bool:
    """Whether a file is there; an unreachable store counts as not."""
    try:
        return exists(location)
    except OSError:
        return False


def _most_foreground(masks: torch.Tensor, volumes: list[str], count: int) -> torch.Tensor:
    """The slices with the most foreground, one per volume first (different patients and
    frames show more than neighbouring slices of one volume), then the next best."""
    order = torch.argsort((masks > 0).flatten(1).sum(1), descending=True).tolist()
    first: list[int] = []
    seen: set[str] = set()
    for index in order:
        if volumes[index] not in seen:
            seen.add(volumes[index])
            first.append(index)
    chosen = set(first)
    rest = [i for i in order if i not in chosen]
    return torch.tensor((first + rest)[:count])


def _predict(run: RunMetrics, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    model = build_unet(run.arch, images.shape[1], num_classes)
    # read whole (a run in an object store too); safetensors parses bytes without pickle
    state = safetensors.torch.load(read_bytes(join(run.run_dir, BEST_WEIGHTS)))
    model.load_state_dict(state)
    cpu = torch.device("cpu")
    return predict(model, DeviceSlices.images_only(images, cpu), cpu, batch_size=len(images))


def _contours(ax: plt.Axes, labels: np.ndarray, num_classes: int) -> None:
    for class_id in range(1, num_classes):
        if (labels == class_id).any():
            ax.contour(labels == class_id, levels=[0.5],
                       colors=[CLASS_COLOURS[class_id % len(CLASS_COLOURS)]], linewidths=1)
