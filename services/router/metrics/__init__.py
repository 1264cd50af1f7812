"""What the router shows of the requests it serves: Prometheus series per model and route and
the admission gauges (`requests`), the OpenTelemetry GenAI figures and span attributes
(`genai`), and the spans of each step of a request (`spans`)."""

from services.common.model_labels import ModelLabels, model_labels
from services.router.metrics.genai import GenAIMetrics
from services.router.metrics.requests import RequestMetrics

__all__ = ["GenAIMetrics", "ModelLabels", "RequestMetrics", "model_labels"]
