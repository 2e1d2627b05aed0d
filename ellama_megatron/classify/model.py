"""The classifier: scikit-learn logistic regression over hashed features, saved as a folder.

A model folder holds ``model.joblib`` (the fitted scikit-learn estimator, for anyone who wants to
inspect or refit it) and ``classifier.json`` (feature settings, threshold, held-out metrics, data
summary). Scoring does not go through scikit-learn: it reads the weight vector once and computes
w . x + b straight from the hashed features (see features.linear_scores).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ellama_megatron.classify.features import FeatureConfig, feature_matrix, linear_scores
from ellama_megatron.formats.atomic import staged_output

FORMAT = "ellama-domain-classifier/1"
META_FILE = "classifier.json"
ESTIMATOR_FILE = "model.joblib"


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
    def load(cls, path: str | Path) -> "DomainClassifier":
        import joblib

        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"{path}: not a classifier folder (no {META_FILE}); train one with "
                             "`python tools/domain_classifier.py train ... --out {path}`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        est = joblib.load(path / ESTIMATOR_FILE)
        cfg = FeatureConfig.from_dict(meta["features"])
        coef = np.asarray(est.coef_, dtype=np.float32).reshape(-1)
        if coef.shape[0] != cfg.n_features:
            raise ValueError(f"{path / ESTIMATOR_FILE}: {coef.shape[0]} weights, but {META_FILE} says n_features={cfg.n_features}")
        return cls(cfg, coef, float(np.asarray(est.intercept_).reshape(-1)[0]), meta)


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
    features: FeatureConfig = FeatureConfig(),
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


def save_classifier(clf: DomainClassifier, estimator, out: str | Path, extra: dict | None = None) -> Path:
    """Write the model folder under a temporary name, then rename it into place."""
    import joblib

    out = Path(out)
    with staged_output(out) as tmp:
        joblib.dump(estimator, tmp / ESTIMATOR_FILE)
        meta = dict(clf.metadata)
        meta.update(extra or {})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out
