"""Alerts: a failed scheduled run posts a short message to a Mattermost/Slack-compatible incoming webhook.

The webhook URL is a secret (its path is the token): ``datamart.alert_webhook_url`` in ``.dlt/secrets.toml`` or
``DATAMART__ALERT_WEBHOOK_URL``. Every message goes through :func:`redact` first: no password, key, token or the
webhook URL itself ever leaves in it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable

from datamart.redact import redact as redact_secrets
from datamart.settings import secret

WEBHOOK_KEY = "datamart.alert_webhook_url"


class AlertError(RuntimeError):
    """The webhook could not be reached or refused the message."""


def webhook_url() -> str | None:
    """The alert webhook URL from dlt's secrets or ``DATAMART__ALERT_WEBHOOK_URL``; None when alerts are off."""
    value = secret(WEBHOOK_KEY)
    return str(value) if value else None


def alert_secrets() -> set[str]:
    """Secrets a message could carry beyond the environment's: dlt's secrets, the warehouse password, the webhook."""
    candidates: list[str] = []
    try:
        from datamart.settings import resolve_warehouse

        warehouse = resolve_warehouse()
        if warehouse.pg is not None and warehouse.pg.password:
            candidates.append(str(warehouse.pg.password))
    except Exception:  # noqa: BLE001 - no warehouse configured: nothing of it to hide
        pass
    try:
        for key in ("datamart.pii_hmac_key", WEBHOOK_KEY, "datamart.metabase_password"):
            value = secret(key)
            if value:
                candidates.append(str(value))
    except Exception:  # noqa: BLE001 - dlt's providers unreadable: the environment variables were still taken
        pass
    candidates.append(os.environ.get("DATAMART__ALERT_WEBHOOK_URL") or "")  # also when dlt's providers failed above
    found = {v for v in candidates if len(v) >= 6}  # a short value ("1", "dev") would mask ordinary words
    for value in candidates:
        if "://" in value:  # a URL: its password, and for a webhook the token segments of its path
            found.update(part for part in value.split("://", 1)[-1].split("/")[1:] if len(part) >= 12)
    return found


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` through :func:`datamart.redact.redact`, also masking :func:`alert_secrets` (or ``secrets``)."""
    return redact_secrets(text, alert_secrets() if secrets is None else secrets)


def post_alert(url: str, text: str, timeout: float = 10.0) -> None:
    """POST ``{"text": ...}`` (what Mattermost and Slack incoming webhooks take); raise :class:`AlertError`."""
    body = json.dumps({"text": text, "username": "datamart"}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if response.status >= 300:
                raise AlertError(f"the alert webhook answered HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise AlertError(f"the alert webhook answered HTTP {exc.code}: check datamart.alert_webhook_url") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AlertError(
            f"the alert webhook could not be reached ({reason}): check datamart.alert_webhook_url"
        ) from None
