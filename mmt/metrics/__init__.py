"""Evaluation metrics computed by the reference implementations the papers report."""
