"""Prefect flows: ``distill-cifar`` (the lab as a pipeline) and ``distill-train`` (one training stage)."""
