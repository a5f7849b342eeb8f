"""distill: the pure compute core of the distillation pipeline.

Imports torch, torchvision, numpy, pillow, pydantic, safetensors and tqdm only; it runs on a GPU box
without Prefect, MLflow or boto3 installed.
"""

__version__ = "0.1.0"
