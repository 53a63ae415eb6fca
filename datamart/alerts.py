"""Alerts: a failed scheduled run posts a short message to a Mattermost/Slack-compatible incoming webhook.

The webhook URL is a secret (its path is the token): ``datamart.alert_webhook_url`` in ``.dlt/secrets.toml`` or
``DATAMART__ALERT_WEBHOOK_URL``. Every message goes through :func:`redact` first: no password, key, token or the
webhook URL itself ever leaves in it.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable

WEBHOOK_KEY = "datamart.alert_webhook_url"
SECRET_NAME = re.compile(r"(CREDENTIALS|PASSWORD|SECRET|KEY|TOKEN|WEBHOOK|DSN)", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]+)@", re.I)
MASK = "***"


class AlertError(RuntimeError):
    """The webhook could not be reached or refused the message."""


def webhook_url() -> str | None:
    """The alert webhook URL from dlt's secrets or ``DATAMART__ALERT_WEBHOOK_URL``; None when alerts are off."""
    import dlt

    value = os.environ.get("DATAMART__ALERT_WEBHOOK_URL") or dlt.secrets.get(WEBHOOK_KEY)
    return str(value) if value else None


def secret_values(extra: Iterable[str] = ()) -> set[str]:
    """Values that must never appear in a message: secret-looking variables, the passwords in URLs, dlt's secrets."""
    found: set[str] = set()
    candidates = [v for k, v in os.environ.items() if SECRET_NAME.search(k) and "DUCKDB" not in k] + list(extra)
    try:
        from datamart.settings import resolve_warehouse

        warehouse = resolve_warehouse()
        if warehouse.pg is not None and warehouse.pg.password:
            candidates.append(str(warehouse.pg.password))
    except Exception:  # noqa: BLE001 - no warehouse configured: nothing of it to hide
        pass
    try:
        import dlt

        for key in ("datamart.pii_hmac_key", WEBHOOK_KEY, "datamart.metabase_password"):
            value = dlt.secrets.get(key)
            if value:
                candidates.append(str(value))
    except Exception:  # noqa: BLE001 - dlt's providers unreadable: the environment variables were still taken
        pass
    webhook = os.environ.get("DATAMART__ALERT_WEBHOOK_URL") or ""
    for value in candidates:
        if not value:
            continue
        for match in URL_PASSWORD.finditer(value):
            found.add(match.group("password"))
        if len(value) >= 6:  # a short value ("1", "dev") would mask ordinary words
            found.add(value)
        if value == webhook or "hooks" in value:  # a webhook's token is a segment of its path
            found.update(part for part in value.split("://", 1)[-1].split("/")[1:] if len(part) >= 12)
    return found


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with URL passwords and every known secret value replaced by ``***``."""
    text = URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{MASK}@", text)
    for value in sorted(secret_values() if secrets is None else set(secrets), key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


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
