"""The feedback loop: from an incident to a better model, and back to serving it.

``policy`` and ``triggers`` decide what asks for a job (incidents, data volume, people) and
what guards it; ``agent`` stores requests from ``<prefix>.retrain``; ``queue`` and ``runner``
run jobs under fenced leases in child processes (``job``); ``dataset`` builds the training
data from labelled examples; ``trainer`` fine-tunes a LoRA adapter; ``gate`` judges it
against the serving version; ``registry`` keeps versions and aliases, ``announce`` tells
``<prefix>.models`` and the webhooks, and ``follower`` loads what is announced. README,
"Closing the loop", walks through it; docs/architecture.md draws the hops.
"""
