"""Evaluation: distributed validation, COCO scoring, the confusion matrix, per-class tables, files."""
