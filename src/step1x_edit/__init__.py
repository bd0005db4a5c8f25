"""Self-hosted, OpenAI-compatible inference server for the Step1X-Edit image-editing model."""

__version__ = "0.1.0"
MODEL_ID = "stepfun-ai/step1x-edit"
