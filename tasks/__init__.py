"""Prefect-side tasks and adapters (storage over file:// and s3://, MLflow tracking).

The pure compute core (``src/distill``) never imports anything from here.
"""
