"""The configured chat model, built from settings: the one place that knows which provider ``LLM_PROVIDER`` names.

Imported by the composition root (``app.py``) only.
"""

from __future__ import annotations

from services.model import ChatModel
from services.model.bedrock import BedrockModel
from services.model.local import LocalModel
from settings import Settings


def build_model(settings: Settings) -> ChatModel:
    if settings.llm_provider == "bedrock":
        return BedrockModel(settings)
    return LocalModel(token_delay=settings.local_token_delay)
