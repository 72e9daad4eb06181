"""BatchTrigger: what Airflow's triggerer runs while a deferred EmbeddingJobOperator's batches run.

It polls `GET {base_url}/batches/{id}` for each batch, as often as a waiting
run would (batch/files.py poll_delay_s: soon while a batch is young, less
often as it ages), through the pipeline's own Batch API client (aiohttp: no
blocking call in the triggerer's event loop; transient failures retried with
the job's backoff). The first batch that finishes (completed, expired,
cancelled or failed) fires the event that resumes the task, whose run then
collects it, writes what is answered and submits what is next.

It serialises to the batch ids, the base URL, the provider's `auth` and
the *name* of the environment variable that holds the key, and its
`headers` and `query` as the job file writes them; the key and every
`${VAR}` in a header or query value are read from the triggerer's
environment when it runs, and never stored. (A value written literally in
the job file is stored as written: write secrets as `${VAR}`.)
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Literal

from airflow.triggers.base import BaseTrigger, TriggerEvent

from ..batch.files import poll_delay_s
from ..batch.watch import FINISHED_STATUSES
from ..config.extras import Fields
from ..config.job import ProviderConfig, RetryConfig
from ..config.schema import fill_env
from ..errors import PipelineError, ProviderError
from ..providers.batch_api import BatchClient
from ..providers.openai import USER_AGENT as CLIENT_AGENT

log = logging.getLogger("pipeline")

EventStatus = Literal["finished", "check", "error"]
# finished: a batch finished, the task collects it; check: nothing to poll, or an answer a run should
# look at (a batch the provider no longer knows); error: this triggerer cannot poll (key unset or refused)
TRIGGER_TIMEOUT_S = 60.0  # per request: a batch's status is a small JSON
USER_AGENT = f"{CLIENT_AGENT} (airflow trigger)"  # the provider's logs tell the triggerer's polls apart


def event(status: EventStatus, **fields: Any) -> TriggerEvent:
    return TriggerEvent({"status": status, **fields})


class BatchTrigger(BaseTrigger):
    def __init__(self, *, batch_ids: list[str], created_s: list[float], base_url: str, api_key_env: str | None,
                 provider: str, poll_interval_s: float, max_attempts: int = 6, auth: str = "bearer",
                 headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> None:
        # auth, headers, query: defaults are what a trigger serialised before they were carried meant
        super().__init__()
        self.auth = auth
        self.headers = dict(headers or {})  # as written: ${VAR}s filled when it runs
        self.query = dict(query or {})
        self.batch_ids = list(batch_ids)
        self.created_s = list(created_s)  # each batch's creation, epoch seconds: how often it is polled
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.provider = provider
        self.poll_interval_s = poll_interval_s
        self.max_attempts = max_attempts

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "batch_ids": self.batch_ids, "created_s": self.created_s, "base_url": self.base_url,
            "api_key_env": self.api_key_env, "provider": self.provider, "poll_interval_s": self.poll_interval_s,
            "max_attempts": self.max_attempts, "auth": self.auth, "headers": self.headers, "query": self.query,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        if not self.batch_ids:  # batches recorded without an id yet: the task's next run settles them
            await asyncio.sleep(self.poll_interval_s)
            yield event("check", reason="batches without an id")
            return
        key = os.environ.get(self.api_key_env or "")
        headers, missing = filled(self.headers)
        query, missing_query = filled(self.query)
        if not key and self.auth != "none":
            missing.insert(0, self.api_key_env or "the key's variable")
        if missing or missing_query:
            names = ", ".join(dict.fromkeys(missing + missing_query))
            yield event("error", message=f"the triggerer's environment has no {names} to poll {self.provider}'s "
                                         f"batches with: set it where the triggerer runs")
            return
        cfg = ProviderConfig(name=self.provider, type="openai_batch", base_url=self.base_url, api_key=key or None,
                             timeout_s=TRIGGER_TIMEOUT_S, poll_interval_s=self.poll_interval_s, auth=self.auth,
                             headers=Fields(headers), query=Fields(query))
        client = BatchClient(cfg, RetryConfig(max_attempts=self.max_attempts), user_agent=USER_AGENT)
        await client.start()
        try:
            yield await self._first_finished(client)
        finally:
            await client.close()

    async def _first_finished(self, client: BatchClient) -> TriggerEvent:
        due = {batch_id: 0.0 for batch_id in self.batch_ids}  # monotonic time of each batch's next poll
        created = dict(zip(self.batch_ids, self.created_s))
        while True:
            now = time.monotonic()
            for batch_id in [b for b, t in due.items() if t <= now]:
                try:
                    info = await client.get(batch_id)
                except ProviderError as err:
                    if err.kind == "unusable" and err.status not in (None, 404):
                        return event("error", message=f"polling batch {batch_id}: {err}")
                    if err.kind == "unusable" or err.kind == "bad_input":  # the provider no longer knows it
                        return event("check", reason=f"batch {batch_id}: {err}")
                    log.info("%s: polling batch %s failed (%s); trying again later", self.provider, batch_id, err)
                    info = None
                except PipelineError as err:
                    return event("check", reason=f"batch {batch_id}: {err}")
                if info is not None and info.status in FINISHED_STATUSES:
                    return event("finished", batch_id=batch_id, batch_status=info.status)
                age_s = max(0.0, time.time() - created.get(batch_id, 0.0))
                due[batch_id] = time.monotonic() + poll_delay_s(age_s, self.poll_interval_s)
            await asyncio.sleep(max(0.0, min(due.values()) - time.monotonic()))


def filled(fields: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Header or query values with their ${VAR}s filled from this process's
    environment, and the variables it lacks."""
    out: dict[str, str] = {}
    missing: list[str] = []
    for name, template in fields.items():
        out[name], lacking = fill_env(template, os.environ)
        missing += lacking
    return out, missing
