"""Online jobs' records under OUTPUT_ROOT/_jobs: what any ingress replica reads, and the lease that lets one replica at
a time run a job (docs/guide/bulk.md, Online jobs).

    _jobs/<job_id>/job.json     the output and the specs, written once when the job is submitted
    _jobs/<job_id>/status.json  the owner's last word: JobStatus with owner, epoch and beat, rewritten each heartbeat
    _jobs/<job_id>/lease-<n>    created once, by exactly one replica: whoever creates lease-n owns epoch n
    _jobs/<job_id>/cancel       written by the replica that answers DELETE; the owner stops launching tours
"""

from __future__ import annotations

import json

from diffpano.io import storage
from diffpano.specs import BulkSpec
from serve.schemas import JobStatus

JOBS = "_jobs"
FINISHED = ("done", "failed", "cancelled")
LEASE = "lease-"


class JobRecord(JobStatus):
    """status.json: the status its owner last recorded, with the lease it holds (owner, epoch) and a beat counter."""

    owner: str
    epoch: int
    beat: int = 0

    def public(self) -> JobStatus:
        """The status as GET /v1/jobs reports it."""
        return JobStatus.model_validate(self.model_dump(include=set(JobStatus.model_fields)))


class JobStore:
    """The job records under one output root; job.json files are cached (they never change)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._jobs: dict[str, tuple[str, frozenset[str]]] = {}  # job id -> (output, tour ids), for tour look-ups

    def _uri(self, job_id: str, name: str = "") -> str:
        """A file of the job's record (its folder when name is empty)."""
        return storage.join(self.root, JOBS, job_id, name) if name else storage.join(self.root, JOBS, job_id)

    def create(self, job_id: str, out: str, specs: list[BulkSpec], webhook: dict | None = None) -> None:
        """Record a new job's output, specs and webhook ({"url", "events"}: whichever replica runs it delivers)."""
        body = {"job_id": job_id, "out": out, "specs": [s.model_dump(exclude_none=True) for s in specs],
                "webhook": webhook}
        storage.write_bytes(self._uri(job_id, "job.json"), json.dumps(body).encode())

    def _job(self, job_id: str) -> dict:
        """The job's job.json."""
        return json.loads(storage.read_bytes(self._uri(job_id, "job.json")))

    def load(self, job_id: str) -> tuple[str, list[BulkSpec], dict | None]:
        """A job's output, specs and webhook."""
        body = self._job(job_id)
        return body["out"], [BulkSpec.model_validate(s) for s in body["specs"]], body.get("webhook")

    def job_ids(self) -> list[str]:
        """Every recorded job."""
        return [uri.rsplit("/", 2)[-2] for uri in storage.list_files(storage.join(self.root, JOBS), "job.json")]

    def read(self, job_id: str) -> JobRecord | None:
        """The job's status record, None before its first one (read whole: its owner rewrites it every heartbeat)."""
        try:
            return JobRecord.model_validate_json(storage.read_bytes(self._uri(job_id, "status.json")))
        except FileNotFoundError:
            return None

    def write(self, record: JobRecord) -> None:
        """Replace the job's status record (the owner's call)."""
        storage.write_bytes(self._uri(record.job_id, "status.json"), record.model_dump_json().encode())

    def status(self, job_id: str) -> JobStatus | None:
        """The job's status as any replica reports it: a cancel already asked for shows at once."""
        record = self.read(job_id)
        if record is None:
            return None
        status = record.public()
        if status.state not in FINISHED and self.cancel_requested(job_id):
            status.state = "cancelled"
        return status

    def request_cancel(self, job_id: str) -> None:
        """Ask the job's owner, whichever replica it is, to stop launching tours."""
        storage.write_bytes(self._uri(job_id, "cancel"), b"")

    def cancel_requested(self, job_id: str) -> bool:
        """Whether any replica asked the job to stop."""
        return storage.exists(self._uri(job_id, "cancel"))

    def superseded(self, job_id: str, epoch: int) -> bool:
        """Whether another replica has taken the job over from the owner of `epoch`."""
        return storage.exists(self._uri(job_id, f"{LEASE}{epoch + 1}"))

    def lease(self, job_id: str) -> int:
        """The job's latest epoch (0 before any replica claimed it)."""
        names = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(self._uri(job_id))]
        return max((int(name[len(LEASE):]) for name in names if name.startswith(LEASE)), default=0)

    def claim(self, job_id: str, owner: str, epoch: int) -> bool:
        """Take epoch `epoch` of the job's lease; False when another replica took it first."""
        return storage.create_once(self._uri(job_id, f"{LEASE}{epoch}"), owner.encode())

    def outputs_holding(self, tour_id: str) -> list[str]:
        """The outputs of the jobs whose specs name this tour."""
        for job_id in set(self.job_ids()) - self._jobs.keys():
            body = self._job(job_id)
            self._jobs[job_id] = body["out"], frozenset(s["tour_id"] for s in body["specs"])
        return sorted({out for out, ids in self._jobs.values() if tour_id in ids})
