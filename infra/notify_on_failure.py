"""Alerts when a distill flow run fails: a Prefect notification block and an automation, made idempotently.

    DISTILL_ALERT_WEBHOOK_URL=https://hooks.slack.com/services/... python infra/notify_on_failure.py
    DISTILL_ALERT_WEBHOOK_URL=https://alerts.example/hook DISTILL_ALERT_KIND=webhook python infra/notify_on_failure.py

The automation fires on every Failed, Crashed or TimedOut run of the flows distill-cifar, distill-lm,
distill-diffusion and distill-train (a dispatched training stage) and sends the flow, the run, its state
message (e.g. "invalid parameters, nothing was run: overrides.student_train: ...") and a link to the run.
``DISTILL_ALERT_KIND``: ``slack`` (default; a Slack incoming webhook) or ``webhook`` (a JSON POST of
``{"subject", "body"}`` to any URL). Run it again to change the URL: the block and the automation are
updated in place. Needs PREFECT_API_URL (or the active profile's server).
"""

from __future__ import annotations

import os
import sys

from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.client.orchestration import get_client
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

BLOCK_NAME = "distill-alerts"
AUTOMATION_NAME = "distill: alert on failed runs"
FLOWS = ("distill-cifar", "distill-lm", "distill-diffusion", "distill-train")
EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut")
SUBJECT = "distill: {{ flow.name }} / {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = ("Flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: "
        "{{ flow_run.state.message }}\nParameters: {{ flow_run.parameters }}\n{{ flow_run|ui_url }}")


def save_block(url: str, kind: str = "slack") -> str:
    """The notification block ``distill-alerts`` (created or overwritten); returns its id."""
    if kind == "slack":
        block = SlackWebhook(url=url)
    elif kind == "webhook":
        block = CustomWebhookNotificationBlock(name="distill", url=url, method="POST",
                                               json_data={"subject": "{{subject}}", "body": "{{body}}"},
                                               allow_private_urls=True)
    else:
        raise ValueError(f"DISTILL_ALERT_KIND must be 'slack' or 'webhook', got {kind!r}")
    return str(block.save(BLOCK_NAME, overwrite=True))


def automation(block_id: str) -> AutomationCore:
    trigger = EventTrigger(
        expect=set(EVENTS), posture=Posture.Reactive, threshold=1, within=0,
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)},
    )
    return AutomationCore(name=AUTOMATION_NAME, description="alert on failed, crashed or timed-out distill runs",
                          trigger=trigger, actions=[SendNotification(block_document_id=block_id, subject=SUBJECT,
                                                                     body=BODY)])


def apply(url: str, kind: str = "slack") -> str:
    """Create or update the block and the automation; returns the automation's id."""
    spec = automation(save_block(url, kind))
    with get_client(sync_client=True) as client:
        existing = [a for a in client.read_automations_by_name(AUTOMATION_NAME)]
        if existing:
            client.update_automation(existing[0].id, spec)
            return str(existing[0].id)
        return str(client.create_automation(spec))


def main() -> int:
    url = os.environ.get("DISTILL_ALERT_WEBHOOK_URL", "").strip()
    if not url:
        print("set DISTILL_ALERT_WEBHOOK_URL to the webhook that receives the alerts", file=sys.stderr)
        return 2
    print(f"automation {AUTOMATION_NAME!r}: {apply(url, os.environ.get('DISTILL_ALERT_KIND', 'slack'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
