"""LLM provider health: probe an OpenAI-compatible server's ``/v1/models`` and describe the result."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

ENV_PROVIDER = "LOCAL_STORY_PROVIDER_URL"
ENV_HEALTHCHECK = "LOCAL_LLM_HEALTHCHECK_URL"
ENV_SKIP = "LOCAL_LLM_SKIP_HEALTHCHECK"
ENV_OVERRIDE = "LOCAL_LLM_MODEL"
TIMEOUT = 5.0


def models_url(url: str) -> str:
    """``…/v1/models`` of an OpenAI-compatible base or chat URL (``…/v1/chat/completions``)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path
    if path.rstrip("/").endswith("/v1/models"):
        new_path = path
    elif "/v1/" in path + "/":
        new_path = path[: (path + "/").index("/v1/")] + "/v1/models"
    else:
        new_path = path.rstrip("/") + "/v1/models"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, new_path, "", ""))


def health_from_env(env: Mapping[str, str], *, timeout: float = TIMEOUT) -> dict[str, Any] | None:
    """``LLMHealthInfo`` for the configured provider; ``None`` when none is configured."""
    url = env.get(ENV_HEALTHCHECK) or env.get(ENV_PROVIDER)
    override = env.get(ENV_OVERRIDE) or "default"
    if env.get(ENV_SKIP, "").strip().lower() in ("1", "true", "yes"):
        return {"Url": url, "Status": "skipped", "Skipped": True, "Override": override}
    if not url:
        return None
    return probe(models_url(url), override=override, timeout=timeout)


def probe(url: str, *, override: str = "default", timeout: float = TIMEOUT) -> dict[str, Any]:
    """GET ``url`` (a models list) and summarise: success with the model ids, or error with the reason."""
    info: dict[str, Any] = {"Url": url, "Skipped": False, "Override": override}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8", errors="replace"))
    except urllib.error.HTTPError as exc:
        return {**info, "Status": "error", "Models": [], "Error": f"HTTP {exc.code} from {url}"}
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return {**info, "Status": "error", "Models": [], "Error": f"{url} unreachable: {reason}"}
    except ValueError as exc:
        return {**info, "Status": "error", "Models": [], "Error": f"{url} did not answer JSON: {exc}"}
    data = body.get("data") if isinstance(body, Mapping) else None
    if not isinstance(data, list):
        return {**info, "Status": "error", "Models": [], "Error": f"{url} answered without a 'data' list"}
    models = [str(m.get("id")) for m in data if isinstance(m, Mapping) and m.get("id") is not None]
    return {**info, "Status": "success", "Models": models}
