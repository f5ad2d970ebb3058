"""Evaluation of backbones and classifiers: features, weighted kNN, metrics."""
