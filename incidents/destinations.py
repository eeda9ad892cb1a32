"""Render one queued notification into the HTTP request a destination expects.

- ``webhook``: genmon's JSON (``schema: genmon.notification/v1``), signed when the
  destination has a ``secret`` as Standard Webhooks specifies: HMAC-SHA256 over
  ``id + "." + timestamp + "." + body`` in ``webhook-signature``, beside ``webhook-id``
  (the idempotency key) and ``webhook-timestamp`` (see :mod:`genmon.incidents.signing`);
- ``slack``: an incoming-webhook message with ``text`` and ``blocks``;
- ``pagerduty``: an Events API v2 event (``dedup_key`` = incident id, so trigger,
  acknowledge and resolve act on the same PagerDuty incident);
- ``alertmanager``: Alertmanager's webhook payload (``version: "4"``), for receivers
  written for Prometheus alerts.

The scheduler's daily digest (event ``digest``, about no one incident) goes to webhook
(``schema: genmon.digest/v1``, signed like every payload) and Slack (its text in one
section) only; PagerDuty and Alertmanager are for pages, and refuse it with a
:class:`~genmon.exceptions.ConfigurationError` (the dispatcher makes such a row dead).

Every incident's payload links to its page on the dashboard (``incident.url``, stored with
the row by :mod:`genmon.incidents.notifications` from ``api.public_url``): the webhook's
``url``, Slack's linked headline, PagerDuty's ``links`` and ``client_url``, Alertmanager's
``generatorURL``.

Every request carries the notification's idempotency key in the ``Idempotency-Key``
header and in the body. Secrets (URL, HMAC key, routing key) stay in
:class:`~pydantic.SecretStr` and are never put in logs or error messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from genmon.exceptions import ConfigurationError
from genmon.incidents.signing import signed_headers
from genmon.settings import DestinationSettings

IDEMPOTENCY_HEADER = "Idempotency-Key"
WEBHOOK_SCHEMA = "genmon.notification/v1"
#: The schema of the daily digest's webhook body (:mod:`genmon.scheduler.digest`).
DIGEST_SCHEMA = "genmon.digest/v1"
#: The event of the daily digest (``NotificationEvent.DIGEST``).
DIGEST_EVENT = "digest"
#: Alertmanager's "not ended yet" value of endsAt.
ALERTMANAGER_ZERO_TIME = "0001-01-01T00:00:00Z"
PAGERDUTY_SUMMARY_CHARS = 1024
#: Slack refuses a section text over 3,000 characters.
SLACK_SECTION_CHARS = 2900
PAGERDUTY_SEVERITIES = {"info", "warning", "error", "critical"}


@dataclass(frozen=True)
class Message:
    """What the dispatcher hands to a destination: the outbox row, decoded."""

    idempotency_key: str
    event: str
    payload: dict[str, Any]
    incident_id: str | None
    """``None`` for the digest, which concerns no one incident."""


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str).encode()


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clusters_text(incident: dict[str, Any]) -> str | None:
    """Slack mrkdwn of the affected-example clusters in the evidence, if there are any."""
    details = (incident.get("evidence") or {}).get("details") or {}
    clusters = details.get("clusters") or []
    if not clusters:
        return None
    analysis = details.get("error_analysis") or {}
    lines = [f"*Affected examples* ({analysis.get('examples', '?')} sampled, by cluster)"]
    for cluster in clusters:
        shown = (cluster.get("representatives") or ["?"])[0]
        lines.append(f"• {cluster.get('size')}× {_slack_escape(str(shown))}")
    return "\n".join(lines)[:SLACK_SECTION_CHARS]


def incident_url(payload: dict[str, Any]) -> str:
    """The incident's dashboard page, ``""`` for a row queued before pages had links."""
    return str((payload.get("incident") or {}).get("url") or "")


def _runbooks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for runbook in (payload.get("runbook"), payload.get("route_runbook")):
        if runbook and (runbook.get("url") or runbook.get("remediation")):
            found.append(runbook)
    return found


class Destination:
    """Base of the renderers; ``render`` returns the request to POST."""

    type: str = ""

    def __init__(self, settings: DestinationSettings) -> None:
        self.settings = settings
        self.name = settings.name

    @property
    def url(self) -> str:
        return self.settings.url.get_secret_value()

    def secrets(self) -> list[str]:
        """Strings that must be scrubbed from any error message about this destination."""
        values = [self.url]
        settings = self.settings
        for secret in (settings.secret, settings.routing_key, settings.heartbeat_url):
            if secret is not None:
                values.append(secret.get_secret_value())
        return [value for value in values if value]

    def body(self, message: Message) -> dict[str, Any]:
        raise NotImplementedError

    def refuse_digest(self, message: Message) -> None:
        """Pages only: a digest here is a configuration error (the scheduler refuses such a
        ``scheduler.digest_destination`` too)."""
        if message.event == DIGEST_EVENT:
            raise ConfigurationError(
                f"{self.type} destination {self.name!r} takes pages, not the daily digest;"
                " set scheduler.digest_destination to a webhook or slack destination"
            )

    def render(self, message: Message) -> Request:
        body = _dumps(self.body(message))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "genmon-notifier/1",
            IDEMPOTENCY_HEADER: message.idempotency_key,
        }
        return Request(self.url, body, headers)


class WebhookDestination(Destination):
    type = "webhook"

    def body(self, message: Message) -> dict[str, Any]:
        payload = message.payload
        if message.event == DIGEST_EVENT:
            return {
                "schema": DIGEST_SCHEMA,
                "idempotency_key": message.idempotency_key,
                "event": message.event,
                "created_at": payload.get("created_at"),
                "digest": payload.get("digest", {}),
            }
        return {
            "schema": WEBHOOK_SCHEMA,
            "idempotency_key": message.idempotency_key,
            "event": message.event,
            "sequence": payload.get("sequence"),
            "reason": payload.get("reason"),
            "created_at": payload.get("created_at"),
            "url": incident_url(payload),
            "labels": payload.get("labels", {}),
            "incident": payload.get("incident", {}),
            "runbooks": _runbooks(payload),
        }

    def render(self, message: Message) -> Request:
        request = super().render(message)
        if self.settings.secret is not None:
            request.headers.update(
                signed_headers(self.settings.secret, message.idempotency_key, request.body)
            )
        return request


class SlackDestination(Destination):
    type = "slack"
    _EMOJI: ClassVar[dict[str, str]] = {
        "critical": ":red_circle:",
        "error": ":large_orange_circle:",
        "warning": ":warning:",
    }

    def body(self, message: Message) -> dict[str, Any]:
        if message.event == DIGEST_EVENT:
            return self._digest(message)
        incident = message.payload.get("incident", {})
        severity = incident.get("severity", "warning")
        status = "RESOLVED" if message.event == "resolve" else message.event.upper()
        emoji = (
            ":white_check_mark:" if message.event == "resolve" else self._EMOJI.get(severity, "")
        )
        headline = f"{emoji} [{status}] {incident.get('title', '')}".strip()
        url = incident_url(message.payload)
        # mrkdwn: the link text ends at ">"; Slack wants &, < and > escaped in it.
        linked = f"<{url}|{_slack_escape(headline)}>" if url else headline
        fields = [
            f"*Severity*\n{severity}",
            f"*Model*\n{incident.get('model_id')}",
            f"*Detector*\n{incident.get('detector')} ({incident.get('kind')})",
            f"*Score*\n{incident.get('last_score')} (peak {incident.get('peak_score')})",
        ]
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{linked}*"}},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": str(message.payload.get("reason") or "-")[:2900],
                },
            },
        ]
        clusters = _clusters_text(incident)
        if clusters is not None:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": clusters}})
        for runbook in _runbooks(message.payload):
            lines = [f"<{runbook['url']}|Runbook>"] if runbook.get("url") else []
            lines += [f"{i}. {step}" for i, step in enumerate(runbook.get("remediation", []), 1)]
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}})
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"incident {incident.get('id')} · key {message.idempotency_key}",
                    }
                ],
            }
        )
        return {"text": headline, "blocks": blocks}

    @staticmethod
    def _digest(message: Message) -> dict[str, Any]:
        """The digest's first line as the notification text, all of it in one section."""
        text = _slack_escape(str(message.payload.get("text") or "genmon digest"))
        section = {"type": "mrkdwn", "text": text[:SLACK_SECTION_CHARS]}
        return {"text": text.splitlines()[0], "blocks": [{"type": "section", "text": section}]}


class PagerDutyDestination(Destination):
    """PagerDuty Events API v2 (https://developer.pagerduty.com/docs/events-api-v2/)."""

    type = "pagerduty"
    _ACTIONS: ClassVar[dict[str, str]] = {
        "trigger": "trigger",
        "update": "trigger",  # a trigger with the same dedup_key updates the alert
        "acknowledge": "acknowledge",
        "resolve": "resolve",
    }

    def __init__(self, settings: DestinationSettings) -> None:
        super().__init__(settings)
        if settings.routing_key is None:
            raise ConfigurationError(
                f"pagerduty destination {settings.name!r} has no routing_key; add the "
                "integration key of its PagerDuty service"
            )
        self.routing_key = settings.routing_key

    def body(self, message: Message) -> dict[str, Any]:
        self.refuse_digest(message)
        incident = message.payload.get("incident", {})
        event: dict[str, Any] = {
            "routing_key": self.routing_key.get_secret_value(),
            "event_action": self._ACTIONS[message.event],
            "dedup_key": message.incident_id,
        }
        if event["event_action"] != "trigger":
            return event
        severity = incident.get("severity", "warning")
        event["payload"] = {
            "summary": str(incident.get("title", "genmon incident"))[:PAGERDUTY_SUMMARY_CHARS],
            "source": f"genmon/{incident.get('model_id')}",
            "severity": severity if severity in PAGERDUTY_SEVERITIES else "warning",
            "timestamp": incident.get("last_seen_at"),
            "component": incident.get("model_id"),
            "group": incident.get("detector"),
            "class": incident.get("kind"),
            "custom_details": {
                "idempotency_key": message.idempotency_key,
                "reason": message.payload.get("reason"),
                "incident": incident,
                "runbooks": _runbooks(message.payload),
            },
        }
        event["client"] = "genmon"
        url = incident_url(message.payload)
        if url:
            event["client_url"] = url
        links = [{"href": url, "text": "Incident in genmon"}] if url else []
        links += [
            {"href": runbook["url"], "text": "Runbook"}
            for runbook in _runbooks(message.payload)
            if runbook.get("url")
        ]
        if links:
            event["links"] = links
        return event


class AlertmanagerDestination(Destination):
    """Alertmanager's webhook_config payload (``version: "4"``)."""

    type = "alertmanager"

    def body(self, message: Message) -> dict[str, Any]:
        self.refuse_digest(message)
        payload = message.payload
        incident = payload.get("incident", {})
        labels = {k: v for k, v in payload.get("labels", {}).items() if v and k != "status"}
        labels["alertname"] = f"genmon_{incident.get('kind', 'finding')}"
        resolved = message.event == "resolve"
        annotations = {
            "summary": str(incident.get("title", "")),
            "description": str(payload.get("reason", "")),
            "incident_id": str(incident.get("id")),
            "idempotency_key": message.idempotency_key,
            "event": message.event,
        }
        for runbook in _runbooks(payload):
            if runbook.get("url"):
                annotations.setdefault("runbook_url", runbook["url"])
            if runbook.get("remediation"):
                annotations.setdefault("remediation", "\n".join(runbook["remediation"]))
        status = "resolved" if resolved else "firing"
        alert = {
            "status": status,
            "labels": labels,
            "annotations": annotations,
            "startsAt": incident.get("opened_at"),
            "endsAt": incident.get("resolved_at") if resolved else ALERTMANAGER_ZERO_TIME,
            "generatorURL": incident_url(payload),
            "fingerprint": str(incident.get("fingerprint", ""))[:16],
        }
        group_labels = {"alertname": labels["alertname"], "model": labels.get("model", "")}
        return {
            "version": "4",
            "groupKey": f'{{}}:{{alertname="{group_labels["alertname"]}", '
            f'incident="{incident.get("id")}"}}',
            "truncatedAlerts": 0,
            "status": status,
            "receiver": self.name,
            "groupLabels": group_labels,
            "commonLabels": labels,
            "commonAnnotations": annotations,
            "externalURL": "",
            "alerts": [alert],
        }


DESTINATION_TYPES: dict[str, type[Destination]] = {
    cls.type: cls
    for cls in (WebhookDestination, SlackDestination, PagerDutyDestination, AlertmanagerDestination)
}


def build_destination(settings: DestinationSettings) -> Destination:
    return DESTINATION_TYPES[settings.type](settings)


def scrub_secrets(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text
