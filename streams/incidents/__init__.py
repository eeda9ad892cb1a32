"""Incidents: findings -> deduplicated incidents -> notifications through an outbox.

Pieces (each module's docstring has the details):

- :mod:`~genmon.streams.incidents.manager`: one incident per *fingerprint* (sha256 of
  model id, detector, signal, segment), enforced by a partial unique index; dedup keys of
  applied findings; the finding's own severity and title (else bands and a generic
  title); auto-resolve after quiet windows; reopen within a cool-down; flapping; related
  incidents linked, each paging as itself; audit trail; notes.
- :mod:`~genmon.streams.incidents.dispatcher`: the transactional outbox's delivery:
  ordered per incident, retries with backoff + jitter, ``Retry-After``, rate limits,
  leases, dead notifications, delivery log; incident transitions go through the same
  outbox to the ``<prefix>.incidents`` topic (:mod:`.publisher`).
- :mod:`~genmon.streams.incidents.silences`: silences, checked when a page is queued and
  again when it is due; acknowledgements and resolves follow their page.
- :mod:`~genmon.streams.incidents.destinations`: webhook (HMAC-signed), Slack,
  PagerDuty Events v2, Alertmanager v4 payloads; :mod:`.signing` has
  :func:`~genmon.streams.incidents.signing.verify_signature` for receivers.
- :mod:`~genmon.streams.incidents.routing`: label matchers, routes, YAML destinations.
- :mod:`~genmon.streams.redact` (shared with window examples): truncation and redaction.
- :mod:`~genmon.streams.incidents.agent`: the worker installer (findings topic agent,
  dispatcher task, dedup-key pruning).
- :mod:`~genmon.streams.incidents.commands`: ``genmon incidents|silences|notify``.

Destinations and routes live in ``notify.destinations``/``notify.routes`` or in the YAML
file named by ``notify.destinations_file`` (``GENMON_NOTIFY__DESTINATIONS_FILE``)::

    destinations:
      - {name: oncall, type: pagerduty, url: https://events.pagerduty.com/v2/enqueue,
         routing_key: <32-char integration key>}
      - {name: hook, type: webhook, url: https://example.com/genmon, secret: <hmac key>}
      - {name: chat, type: slack, url: https://hooks.slack.com/services/T/B/X, rate_per_s: 1}
      - {name: am, type: alertmanager, url: http://receiver:9093/hook}
    routes:   # first match wins unless `continue: true`; no routes = everything everywhere
      - {destinations: [oncall], matchers: ['severity=~"error|critical"'], continue: true}
      - destinations: [chat, hook]
        runbook: {url: https://wiki/genmon, remediation: [check the last deploy]}

Runbooks per detector name or finding kind go in ``incidents.runbooks``.
"""
