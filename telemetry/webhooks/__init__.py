"""Webhooks: signed, retried, durable notices of ended prompts, finalized runs and health changes.

- :mod:`.config`: endpoints and events from the environment and from a run's ``extra_data.telemetry.webhook``;
- :mod:`.events`: the event bodies (pydantic models with committed JSON Schemas) and the HMAC-SHA256 signature;
- :mod:`.outbox`: a delivery, per-endpoint counts, the store methods the outbox needs, the retry schedule;
- :mod:`.delivery`: the delivery thread and its outbox (:class:`WebhookService`);
- :mod:`.targets`: a run's own endpoints, in memory.
"""

from __future__ import annotations

from .config import EVENTS, Endpoint, WebhookConfig, config_from_env, run_webhook_problem, self_url_problem
from .delivery import WebhookService
from .events import prompt_ended_data, sign, verify
from .targets import RunTargets

__all__ = [
    "EVENTS",
    "Endpoint",
    "RunTargets",
    "WebhookConfig",
    "WebhookService",
    "config_from_env",
    "prompt_ended_data",
    "run_webhook_problem",
    "self_url_problem",
    "sign",
    "verify",
]
