"""Accuracy, per-class precision/recall/F1 and a row-normalised confusion matrix on any FER2013 split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fervid.model.config import CLASSES, SCORING_BATCH
from fervid.model.loader import EmotionClassifier
from fervid.training.data import FERPLUS_COLUMNS, FERPLUS_TO_FER, load_fer2013

# FER+ vote columns, in the npz's order, and the FER2013 class each of the first seven is.


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


def ferplus_majority_labels(votes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The FER+ majority label of each row as a FER2013 class index (0..6), or -1 where the row has none.

    A row gets a label when its FER+ entry is valid (`ferplus_valid`) and exactly one of its 10 vote columns
    holds the most votes and that column is one of the seven FER2013 emotions (neutral->Neutral,
    happiness->Happy, surprise->Surprise, sadness->Sad, anger->Angry, disgust->Disgust, fear->Fear). Rows whose
    most-voted column is contempt, unknown or NF, rows with a tie at the top (also a tie between an emotion and
    contempt/unknown/NF) and rows without votes get -1. "Majority" is the plurality of the votes, as counted
    here: FERPlus's own training code has a stricter mode (over half of the votes after dropping single votes).
    """
    votes = np.asarray(votes, dtype=np.int64)
    to_fer = np.array([CLASSES.index(FERPLUS_TO_FER[c]) if c in FERPLUS_TO_FER else -1 for c in FERPLUS_COLUMNS])
    top = votes.max(1)
    unique_top = (votes == top[:, None]).sum(1) == 1
    label = to_fer[votes.argmax(1)]
    return np.where(np.asarray(valid, dtype=bool) & unique_top & (top > 0) & (label >= 0), label, -1)


def evaluate(
    clf: EmotionClassifier,
    data_path: str | Path,
    split: str,
    tta: tuple[str, ...] = (),
    batch_size: int = SCORING_BATCH,
) -> dict:
    """The report of `fervid eval --json`: plain single-crop scores, plus accuracy under each TTA mode.

    When the data carries FER+ votes (the .npz), the report also has `ferplus_majority`: accuracy (and TTA
    accuracy) against the FER+ majority labels of the split's rows that have one (see `ferplus_majority_labels`
    for how rows are chosen), the same faces with a cleaner label.
    """
    data = load_fer2013(data_path)
    mask = data.split_mask(split)
    images, labels = data.images[mask], data.labels[mask]
    faces = torch.from_numpy(images)
    probs = clf.predict_proba_modes(faces, ("none", *tta), batch_size)
    pred = probs.pop("none").argmax(1).numpy()
    tta_pred = {mode: p.argmax(1).numpy() for mode, p in probs.items()}
    n_cls = len(clf.classes)
    cm = confusion_matrix(labels, pred, n_cls)
    report = {
        "model": clf.name,
        "architecture": clf.cfg.architecture,
        "weights_sha256": clf.sha256,
        "precision": clf.precision,
        "data": str(data_path),
        "split": split,
        "n": int(len(labels)),
        "accuracy": round(float((pred == labels).mean()), 4),
        "per_class": per_class_metrics(cm, clf.classes),
        "classes": list(clf.classes),
        "confusion": cm.tolist(),
    }
    if tta:
        report["tta_accuracy"] = {mode: round(float((p == labels).mean()), 4) for mode, p in tta_pred.items()}
    if data.ferplus_votes is not None:
        fp = ferplus_majority_labels(data.ferplus_votes[mask], data.ferplus_valid[mask])
        keep = fp >= 0
        n = int(keep.sum())

        def acc(p: np.ndarray) -> float | None:
            return round(float((p[keep] == fp[keep]).mean()), 4) if n else None

        report["ferplus_majority"] = {"n": n, "accuracy": acc(pred)}
        if tta:
            report["ferplus_majority"]["tta_accuracy"] = {mode: acc(p) for mode, p in tta_pred.items()}
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
