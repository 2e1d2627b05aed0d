"""The classifier: scikit-learn logistic regression over hashed features, saved as a folder.

A model folder holds ``weights.npz`` (the weight vector and bias as plain arrays) and
``classifier.json`` (feature settings, threshold, held-out metrics, data summary). Model folders
are shared and downloaded, so loading one must not be able to run code: numpy arrays are read with
``allow_pickle=False`` and nothing is unpickled (the first format stored a joblib pickle of the
estimator, which runs arbitrary code when loaded; such folders are refused, with the fix).
Scoring does not go through scikit-learn: it computes w . x + b straight from the hashed features
(see features.linear_scores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ellama_megatron.classify.features import FeatureConfig, feature_matrix, linear_scores
from ellama_megatron.formats.atomic import staged_output

# /1 stored a joblib pickle (model.joblib); /2 stores weights.npz, which loads without unpickling.
FORMAT = "ellama-domain-classifier/2"
META_FILE = "classifier.json"
WEIGHTS_FILE = "weights.npz"
PICKLED_ESTIMATOR_FILE = "model.joblib"  # format /1, refused
_RETRAIN = "retrain it with `python tools/domain_classifier.py train ... --out {path}`"


@dataclass
class DomainClassifier:
    features: FeatureConfig
    weights: np.ndarray  # float32, one per hash bucket
    bias: float
    metadata: dict = field(default_factory=dict)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(e-commerce) for each text."""
        z = linear_scores(texts, self.features, self.weights, self.bias)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    @classmethod
    def load(cls, path: str | Path) -> DomainClassifier:
        """Read a model folder; every problem is a ValueError naming the file and field."""
        path = Path(path)
        meta_path = path / META_FILE
        retrain = _RETRAIN.format(path=path)
        if not meta_path.is_file():
            raise ValueError(f"{path}: not a classifier folder (no {META_FILE}); {retrain}")
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e}); {retrain}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}; {retrain}")
        if meta.get("format") != FORMAT:
            if (path / PICKLED_ESTIMATOR_FILE).exists():
                raise ValueError(
                    f"{path / PICKLED_ESTIMATOR_FILE}: old classifier format ({meta.get('format')!r}) stored as a "
                    f"pickle, which can run arbitrary code when loaded, so it is not read; {retrain} "
                    f"(writes {WEIGHTS_FILE}, which loads without unpickling)"
                )
            raise ValueError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}; {retrain}")
        if "features" not in meta:
            raise ValueError(
                f"{meta_path}: missing field 'features' (the hashing settings the model was trained with); {retrain}"
            )
        try:
            cfg = FeatureConfig.from_dict(meta["features"], "features")
        except (ValueError, TypeError) as e:
            raise ValueError(f"{meta_path}: {e}") from None
        weights_path = path / WEIGHTS_FILE
        if not weights_path.is_file():
            raise ValueError(f"{weights_path}: missing; {retrain}")
        try:
            with np.load(weights_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("weights", "bias") if k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{weights_path}: unreadable ({e}); {retrain}") from None
        for k in ("weights", "bias"):
            if k not in arrays:
                raise ValueError(f"{weights_path}: no array {k!r}; {retrain}")
        coef = np.asarray(arrays["weights"], dtype=np.float32).reshape(-1)
        if coef.shape[0] != cfg.n_features:
            raise ValueError(
                f"{weights_path}: {coef.shape[0]} weights, but {META_FILE} says "
                f"features.n_features={cfg.n_features}; {retrain}"
            )
        if arrays["bias"].size != 1 or not np.all(np.isfinite(coef)) or not np.isfinite(arrays["bias"]).all():
            raise ValueError(f"{weights_path}: weights or bias not finite (or bias not one number); {retrain}")
        return cls(cfg, coef, float(arrays["bias"].reshape(-1)[0]), meta)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Precision, recall, F1 and accuracy of ``scores > threshold`` against 0/1 ``labels``."""
    pred = scores > threshold
    truth = labels.astype(bool)
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    tn = int(np.sum(~pred & ~truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": threshold,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / max(len(labels), 1),
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "true_negatives": tn,
    }


def train_classifier(
    positives: Sequence[str],
    negatives: Sequence[str],
    features: FeatureConfig = FeatureConfig(),  # noqa: B008 (a frozen dataclass: one shared default is safe)
    heldout_fraction: float = 0.1,
    c: float = 10.0,
    threshold: float = 0.5,
    seed: int = 0,
):
    """Fit on all but a random ``heldout_fraction`` of each class; report metrics on that part.

    Returns ``(classifier, estimator, report)``. Classes are weighted to balance, so an uneven
    number of positive and negative examples does not move the decision threshold.
    """
    from sklearn.linear_model import LogisticRegression

    if not positives or not negatives:
        raise ValueError(f"need both positive and negative examples (got {len(positives)} and {len(negatives)})")
    texts = list(positives) + list(negatives)
    labels = np.concatenate([np.ones(len(positives), np.int8), np.zeros(len(negatives), np.int8)])
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(texts), dtype=bool)
    for cls in (0, 1):
        idx = np.flatnonzero(labels == cls)
        n_held = int(round(len(idx) * heldout_fraction))
        if heldout_fraction > 0 and n_held == 0 and len(idx) > 1:
            n_held = 1
        heldout[rng.choice(idx, size=n_held, replace=False)] = True
    train_idx = np.flatnonzero(~heldout)
    held_idx = np.flatnonzero(heldout)

    x = feature_matrix(texts, features)
    est = LogisticRegression(C=c, solver="liblinear", class_weight="balanced", max_iter=1000)
    est.fit(x[train_idx], labels[train_idx])
    clf = DomainClassifier(features, est.coef_.astype(np.float32).reshape(-1), float(est.intercept_[0]))

    report: dict = {
        "train": {"positive": int(labels[train_idx].sum()), "negative": int(len(train_idx) - labels[train_idx].sum())},
        "heldout": {"positive": int(labels[held_idx].sum()), "negative": int(len(held_idx) - labels[held_idx].sum())},
        "c": c,
        "seed": seed,
    }
    if len(held_idx):
        held_scores = clf.score([texts[i] for i in held_idx])
        report["heldout_metrics"] = binary_metrics(labels[held_idx], held_scores, threshold)
        if len(set(labels[held_idx].tolist())) == 2:
            from sklearn.metrics import roc_auc_score

            report["heldout_metrics"]["roc_auc"] = float(roc_auc_score(labels[held_idx], held_scores))
    clf.metadata = {"format": FORMAT, "features": features.to_dict(), "threshold": threshold, "training": report}
    return clf, est, report


def save_classifier(clf: DomainClassifier, out: str | Path, extra: dict | None = None) -> Path:
    """Write the model folder under a temporary name, then rename it into place."""
    out = Path(out)
    with staged_output(out) as tmp:
        np.savez(
            tmp / WEIGHTS_FILE,
            weights=np.asarray(clf.weights, dtype=np.float32),
            bias=np.asarray([clf.bias], dtype=np.float64),
        )
        meta = dict(clf.metadata)
        meta.update(extra or {})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
