"""Accuracy, per-class precision/recall/F1 and a row-normalised confusion matrix on any FER2013 split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.loader import EmotionClassifier
from training.data import load_fer2013


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def per_class_metrics(cm: np.ndarray, classes: tuple[str, ...]) -> dict[str, dict]:
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        c: {
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
            "support": int(support[i]),
        }  # fmt: skip
        for i, c in enumerate(classes)
    }


def evaluate(
    clf: EmotionClassifier, data_path: str | Path, split: str, tta: tuple[str, ...] = (), batch_size: int = 256
) -> dict:
    """The report of `fervid eval --json`: plain single-crop scores, plus accuracy under each TTA mode."""
    images, labels = load_fer2013(data_path).split(split)
    faces = torch.from_numpy(images)
    pred = clf.predict_proba(faces, batch_size=batch_size).argmax(1).numpy()
    n_cls = len(clf.classes)
    cm = confusion_matrix(labels, pred, n_cls)
    report = {
        "model": clf.name,
        "architecture": clf.cfg.architecture,
        "weights_sha256": clf.sha256,
        "data": str(data_path),
        "split": split,
        "n": int(len(labels)),
        "accuracy": round(float((pred == labels).mean()), 4),
        "per_class": per_class_metrics(cm, clf.classes),
        "classes": list(clf.classes),
        "confusion": cm.tolist(),
    }
    if tta:
        report["tta_accuracy"] = {
            mode: round(float((clf.predict_proba(faces, batch_size, tta=mode).argmax(1).numpy() == labels).mean()), 4)
            for mode in tta
        }
    return report


def plot_confusion(report: dict, path: str | Path) -> None:
    """Row-normalised confusion matrix with class names on both axes, like the seed's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(report["confusion"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)  # fmt: skip
    ax.set_title(f"{report['model']} on FER2013 {report['split']}: accuracy {report['accuracy']:.4f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
