"""Incidents: findings -> deduplicated incidents -> notifications through an outbox.

Pieces (each module's docstring has the details):

- :mod:`~genmon.incidents.manager`: one incident per *fingerprint* (sha256 of
  model id, detector, signal, segment), enforced by a partial unique index; dedup keys of
  applied findings; auto-resolve after quiet windows; reopen within a cool-down;
  flapping; acknowledge, resolve, notes.
- :mod:`~genmon.incidents.assessment`: the finding's own severity and title (else bands
  and a generic title), evidence snapshot, chart, runbook; no database.
- :mod:`~genmon.incidents.grouping`: which incident a finding belongs to; related
  incidents linked, each paging as itself.
- :mod:`~genmon.incidents.notifications`: the outbox rows of a change, in its
  transaction: audit trail, topic events, pages and their payloads, pages repeated
  when a silence ends.
- :mod:`~genmon.incidents.dispatcher`: the transactional outbox's delivery loop, over
  :mod:`.outbox` (leases, delivery log), :mod:`.ordering` (order per incident and
  destination, enforced by the claim; per-vendor coalescing after an outage),
  :mod:`.delivery` (HTTP, and the ``<prefix>.incidents`` topic through :mod:`.publisher`),
  :mod:`.retry` (backoff + jitter, ``Retry-After``, for ``notify.retry_horizon_s``),
  :mod:`.health` (a failing destination is paused and probed), :mod:`.expiry` (dead past
  the horizon, and an incident about the destination), :mod:`.requeue` (``genmon notify
  retry``, never reordering) and :mod:`.rate_limit`.
- :mod:`~genmon.incidents.silences`: silences, checked when a page is queued and
  again when it is due; acknowledgements and resolves follow their page.
- :mod:`~genmon.incidents.destinations`: webhook (HMAC-signed), Slack,
  PagerDuty Events v2, Alertmanager v4 payloads; :mod:`.signing` has
  :func:`~genmon.incidents.signing.verify_signature` for receivers.
- :mod:`~genmon.incidents.routing`: label matchers, routes, YAML destinations.
- :mod:`~genmon.schemas.redact` (shared with window examples): truncation and redaction.
- :mod:`~genmon.streams.incident_agent`: the worker installer (findings topic agent,
  dispatcher task, dedup-key pruning).
- :mod:`genmon.cli.incidents`, :mod:`~genmon.cli.silences`, :mod:`~genmon.cli.notify`: the
  on-call commands.

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
