"""Sample-quality metrics: Inception feature extraction (clean-fid's network or fid-helper's offline copy),
FID, Inception Score and k-NN precision/recall."""
from gd.metrics.fid import (
    FeatureStats,
    feature_stats,
    frechet_distance,
    inception_score,
    precision_recall,
    reference_features,
)
from gd.metrics.inception import InceptionExtractor, build_inception

__all__ = [
    "FeatureStats",
    "InceptionExtractor",
    "build_inception",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "precision_recall",
    "reference_features",
]
