"""The local horde's bookkeeping: users, requests, handed-out jobs and workers.

Pure logic behind one lock, no HTTP: the server module maps routes onto these methods. The
rules (in `rules.py`) follow the real server (docs/horde-contract.md): batching by `amount`, TTL abort and
re-queue, faulted jobs re-queued, DuplicateGen / AbortedGen, maintenance after more than 20
aborted or faulted jobs in an hour, and "no job" answered with a payload full of defaults.
"""

from __future__ import annotations

import base64
import random
import secrets
import threading
import time
import uuid
from typing import Any

from horde_worker.localhorde.records import Generation, ImageRequest, Worker
from horde_worker.localhorde.rules import (
    ANONYMOUS_KEY,
    EMPTY_PAYLOAD,
    SKIP_KEYS,
    LocalHordeError,
    job_payload,
    job_reward,
    job_ttl,
    unsuitable,
)


class HordeState:
    """All state of the local horde. Every public method takes the lock."""

    def __init__(self, models: list[str], owner_key: str | None = None, min_ttl: int = 150,
                 flux_models: set[str] | None = None, seed: int | None = None, fixed_ttl: int | None = None) -> None:
        self.lock = threading.RLock()
        self.models = list(models)
        self.flux_models = set(flux_models or ())
        self.owner_key = owner_key or secrets.token_urlsafe(16)
        self.users = {self.owner_key: {"username": "local_owner#1", "id": 1, "kudos": 0.0}}
        self.min_ttl = min_ttl
        self.fixed_ttl = fixed_ttl  # tests: every job gets this TTL instead of the formula's
        self.requests: dict[str, ImageRequest] = {}
        self.generations: dict[str, Generation] = {}
        self.workers: dict[str, Worker] = {}
        self.blobs: dict[str, bytes] = {}
        self.usage: dict[str, int] = {}
        self.submits_received = 0
        self.duplicate_submits = 0
        self.random = random.Random(seed)

    # --- users ---------------------------------------------------------------------------

    def user_for(self, apikey: str | None, for_worker: bool = False) -> dict[str, Any]:
        if for_worker and apikey == ANONYMOUS_KEY:
            raise LocalHordeError(403, "AnonForbiddenWorker", "Anonymous user is forbidden from performing this operation")
        user = self.users.get(apikey or "")
        if user is None:
            raise LocalHordeError(401, "InvalidAPIKey", "No user matching sent API Key. Have you remembered to register?")
        return user

    def find_user(self, apikey: str | None) -> dict[str, Any]:
        with self.lock:
            user = self.users.get(apikey or "")
            if user is None:
                raise LocalHordeError(404, "UserNotFound", "User with this api_key not found.")
            worker_ids = [w.id for w in self.workers.values() if w.owner_key == apikey]
            return {**user, "worker_ids": worker_ids, "worker_count": len(worker_ids), "trusted": False,
                    "concurrency": 30, "flagged": False}

    # --- requests ------------------------------------------------------------------------

    def add_request(self, body: dict[str, Any], apikey: str | None = None) -> dict[str, Any]:
        """POST /v2/generate/async."""
        with self.lock:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise LocalHordeError(400, "ValidationError", "Input payload validation failed",
                                      errors={"prompt": "'prompt' is a required property"})
            params = dict(body.get("params") or {})
            n = int(params.get("n", 1))
            if not 1 <= n <= 20:
                raise LocalHordeError(400, "ValidationError", "Input payload validation failed",
                                      errors={"params.n": f"{n} is not in 1..20"})
            for key in ("width", "height"):
                value = int(params.get(key, 512))
                if value % 64 or not 64 <= value <= 3072:
                    raise LocalHordeError(400, "ValidationError", "Input payload validation failed",
                                          errors={f"params.{key}": f"{value} is not a multiple of 64 in 64..3072"})
            models = body.get("models") or list(self.models)
            request = ImageRequest(id=str(uuid.uuid4()), body={**body, "params": params, "models": models},
                                   created=time.time(), pending=n, owner_key=apikey or ANONYMOUS_KEY)
            for key in ("source_image", "source_mask"):
                value = body.get(key)
                if value and not str(value).startswith("http"):
                    blob = f"src/{request.id}_{key}.webp"
                    try:
                        self.blobs[blob] = base64.b64decode(value)
                    except (ValueError, TypeError):
                        raise LocalHordeError(400, "BadRequest", f"{key} is not valid base64") from None
                    request.body[key] = {"blob": blob}
            self.requests[request.id] = request
            return {"id": request.id, "kudos": round(job_reward(params, models[0]) * n, 2)}

    def _blob_ref(self, value: Any, base_url: str) -> Any:
        if isinstance(value, dict) and "blob" in value:
            return f"{base_url}/r2/{value['blob']}?signature={secrets.token_hex(8)}"
        return value

    # --- pop ------------------------------------------------------------------------------

    def pop(self, apikey: str | None, body: dict[str, Any], base_url: str) -> dict[str, Any]:
        """POST /v2/generate/pop."""
        with self.lock:
            self.user_for(apikey, for_worker=True)
            name = body.get("name")
            if not name:
                raise LocalHordeError(400, "ValidationError", "Input payload validation failed",
                                      errors={"name": "'name' is a required property"})
            amount = int(body.get("amount", 1))
            if not 1 <= amount <= 20:
                raise LocalHordeError(400, "ValidationError", "Input payload validation failed",
                                      errors={"amount": f"{amount} is greater than the maximum of 20"})
            models = [m for m in body.get("models") or [] if m in self.models]
            if not models:
                raise LocalHordeError(400, "BadRequest",
                                      "Unfortunately we cannot accept workers serving unrecognised models at this time")
            worker = self._worker_for(apikey or "", name, body, models)
            self._sweep_locked()
            skipped = dict.fromkeys(SKIP_KEYS, 0)
            for request in self.requests.values():
                if request.pending <= 0 or request.faulted:
                    continue
                if worker.maintenance and request.owner_key != worker.owner_key:
                    skipped["worker_id"] += request.pending  # in maintenance only the owner's own requests
                    continue
                reason = unsuitable(request, body, models)
                if reason:
                    skipped[reason] += request.pending
                    continue
                return self._hand_out(request, worker, min(amount, request.pending), body, models, base_url)
            if worker.maintenance:
                why = worker.maintenance_msg or "too many aborted jobs"
                raise LocalHordeError(403, "WorkerMaintenance",
                                      f"Worker {worker.name} is in maintenance mode: {why}."
                                      " Clear it with PUT /v2/workers/{id} {\"maintenance\": false}.")
            return {"payload": dict(EMPTY_PAYLOAD), "id": None, "ids": [], "messages": [], "ttl": None,
                    "skipped": skipped, "model": None, "source_image": None, "source_processing": "img2img",
                    "source_mask": None, "extra_source_images": None, "r2_upload": None, "r2_uploads": None}

    def _worker_for(self, apikey: str, name: str, body: dict[str, Any], models: list[str]) -> Worker:
        worker = next((w for w in self.workers.values() if w.name == name), None)
        if worker is None:
            worker = Worker(id=str(uuid.uuid4()), name=name, owner_key=apikey)
            self.workers[worker.id] = worker
        elif worker.owner_key != apikey:
            raise LocalHordeError(403, "WrongCredentials", f"Wrong credentials to submit as this worker ({name}).")
        worker.models = models
        worker.bridge_agent = str(body.get("bridge_agent", "unknown:0:unknown"))
        worker.last_pop = time.time()
        worker.extra_slow = bool(body.get("extra_slow_worker", False))
        worker.settings = {k: v for k, v in body.items() if k not in ("name", "models")}
        return worker

    def _hand_out(self, request: ImageRequest, worker: Worker, count: int, worker_body: dict[str, Any],
                  models: list[str], base_url: str) -> dict[str, Any]:
        params = request.params
        model = next(m for m in request.body["models"] if m in models)
        request.seed_counter += 1
        if params.get("seed") is not None:
            base = str(params["seed"])
            base_int = int(base) if base.isdigit() else abs(hash(base)) % 2**32
            if params.get("seed_variation"):  # as recorded: 42 with variation 3 is popped as 45
                seed = str(base_int + int(params["seed_variation"]) * request.seed_counter)
            else:  # later pops continue where the last batch's seed + i left off
                handed_out = int(params.get("n", 1)) - request.pending
                seed = str((base_int + handed_out) % 2**32)
        else:
            seed = str(self.random.randrange(2**32))
        ttl = self.fixed_ttl or job_ttl(params, model in self.flux_models, worker.extra_slow, self.min_ttl)
        ids = []
        for _ in range(count):
            gen = Generation(id=str(uuid.uuid4()), request_id=request.id, worker_id=worker.id, worker_name=worker.name,
                             model=model, seed=seed, popped_at=time.time(), ttl=ttl)
            self.generations[gen.id] = gen
            request.generation_ids.append(gen.id)
            ids.append(gen.id)
        request.pending -= count
        worker.uncompleted += count
        uploads = [f"{base_url}/r2/gen/{gid}.webp?signature={secrets.token_hex(8)}" for gid in ids]
        extra = request.body.get("extra_source_images")
        return {
            "payload": job_payload(request, count, seed),
            "id": ids[0], "ids": ids, "messages": [], "ttl": ttl, "skipped": {}, "model": model,
            "source_image": self._blob_ref(request.body.get("source_image"), base_url),
            "source_processing": request.body.get("source_processing", "img2img"),
            "source_mask": self._blob_ref(request.body.get("source_mask"), base_url),
            "extra_source_images": extra,
            "r2_upload": uploads[0], "r2_uploads": uploads,
        }

    # --- submit ---------------------------------------------------------------------------

    def submit(self, apikey: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v2/generate/submit."""
        with self.lock:
            self.submits_received += 1
            errors = {}
            if not body.get("id"):
                errors["id"] = "'id' is a required property"
            if "generation" not in body:
                errors["generation"] = "'generation' is a required property"
            if "seed" in body and not isinstance(body["seed"], int):
                errors["seed"] = f"{body['seed']!r} is not of type 'integer'"
            if errors:
                raise LocalHordeError(400, "ValidationError", "Input payload validation failed", errors=errors)
            self.user_for(apikey)
            gen = self.generations.get(body["id"])
            if gen is None:
                raise LocalHordeError(404, "InvalidJobID", f"Processing Job with ID {body['id']} does not exist.")
            worker = self.workers[gen.worker_id]
            if worker.owner_key != apikey:
                raise LocalHordeError(403, "WrongCredentials", "Wrong credentials to submit this job.")
            if gen.state == "done":
                self.duplicate_submits += 1
                raise LocalHordeError(400, "DuplicateGen", f"Processing Generation with ID {gen.id} already submitted.")
            if gen.state in ("aborted", "faulted"):
                raise LocalHordeError(400, "AbortedGen", f"Processing Generation with ID {gen.id} took too long to "
                                      f"process and has been aborted! Generations must complete within {gen.ttl} seconds.")
            request = self.requests[gen.request_id]
            worker.uncompleted = max(0, worker.uncompleted - 1)
            if body.get("state") == "faulted":
                gen.state = "faulted"
                gen.gen_metadata = list(body.get("gen_metadata") or [])
                self._requeue(request, worker)
                return {"reward": 0.0}
            gen.state = "done"
            gen.generation = body["generation"]
            gen.submitted_seed = body.get("seed")
            gen.gen_metadata = list(body.get("gen_metadata") or [])
            gen.accepted_submits += 1
            gen.reward = job_reward(request.params, gen.model)
            worker.fulfilled += 1
            worker.kudos += gen.reward
            params = request.params
            worker.megapixelsteps += (int(params.get("width", 512)) * int(params.get("height", 512))
                                      * int(params.get("steps", 30)) / 1e6)
            self.users[worker.owner_key]["kudos"] += gen.reward
            self.usage[gen.model] = self.usage.get(gen.model, 0) + 1
            return {"reward": gen.reward}

    def _requeue(self, request: ImageRequest, worker: Worker) -> None:
        request.pending += 1
        request.restarted += 1
        if request.restarted > 10:
            request.faulted = True
        now = time.time()
        worker.failures = [t for t in worker.failures if now - t < 3600] + [now]
        if len(worker.failures) > 20:
            worker.maintenance = True
            worker.maintenance_msg = "more than 20 aborted or faulted jobs in an hour"

    def sweep(self) -> int:
        """Abort jobs past their TTL and hand their images out again; returns how many."""
        with self.lock:
            return self._sweep_locked()

    def _sweep_locked(self) -> int:
        now, aborted = time.time(), 0
        for gen in self.generations.values():
            if gen.state == "processing" and now - gen.popped_at > gen.ttl:
                gen.state = "aborted"
                worker = self.workers[gen.worker_id]
                worker.uncompleted = max(0, worker.uncompleted - 1)
                self._requeue(self.requests[gen.request_id], worker)
                aborted += 1
        return aborted

    # --- status ---------------------------------------------------------------------------

    def status(self, request_id: str, base_url: str, with_generations: bool = True) -> dict[str, Any]:
        """GET /v2/generate/status/{id} (and /check/{id} without generations)."""
        with self.lock:
            request = self.requests.get(request_id)
            if request is None:
                raise LocalHordeError(404, "RequestNotFound", f"Request with ID {request_id} not found.")
            gens = [self.generations[g] for g in request.generation_ids]
            done = [g for g in gens if g.state == "done"]
            processing = [g for g in gens if g.state == "processing"]
            n = int(request.params.get("n", 1))
            answer: dict[str, Any] = {
                "finished": len(done), "processing": len(processing), "restarted": request.restarted,
                "waiting": request.pending, "done": len(done) == n or request.faulted, "faulted": request.faulted,
                "wait_time": 0, "queue_position": 0, "kudos": round(sum(g.reward for g in done), 2),
                "is_possible": True,
            }
            if with_generations:
                answer["generations"] = [self._generation_view(g, request, base_url) for g in done]
                answer["shared"] = bool(request.body.get("shared", False))
            return answer

    def _generation_view(self, gen: Generation, request: ImageRequest, base_url: str) -> dict[str, Any]:
        if gen.generation == "R2" or gen.generation is None:
            img = f"{base_url}/r2/gen/{gen.id}.webp?signature={secrets.token_hex(8)}"
        else:
            img = gen.generation
        censored = any(m.get("type") == "censorship" for m in gen.gen_metadata)
        return {"img": img, "seed": str(gen.submitted_seed if gen.submitted_seed is not None else gen.seed),
                "id": gen.id, "censored": censored, "gen_metadata": gen.gen_metadata, "worker_id": gen.worker_id,
                "worker_name": gen.worker_name, "model": gen.model, "state": "ok"}

    # --- workers and stats -----------------------------------------------------------------

    def worker_view(self, worker_id: str | None = None, name: str | None = None) -> dict[str, Any]:
        with self.lock:
            worker = self.workers.get(worker_id or "") or next(
                (w for w in self.workers.values() if w.name == name), None)
            if worker is None:
                raise LocalHordeError(404, "WorkerNotFound", f"Worker {worker_id or name} not found.")
            online = time.time() - worker.last_pop < 300
            return {"id": worker.id, "name": worker.name, "type": "image", "maintenance_mode": worker.maintenance,
                    "online": online, "requests_fulfilled": worker.fulfilled,
                    "kudos_rewards": round(worker.kudos, 2), "uncompleted_jobs": worker.uncompleted,
                    "megapixelsteps_generated": round(worker.megapixelsteps, 2), "models": worker.models,
                    "bridge_agent": worker.bridge_agent, "threads": worker.settings.get("threads", 1),
                    "max_pixels": worker.settings.get("max_pixels", 262144), "nsfw": worker.settings.get("nsfw", True),
                    "trusted": False, "flagged": False}

    def update_worker(self, apikey: str | None, worker_id: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            worker = self.workers.get(worker_id)
            if worker is None:
                raise LocalHordeError(404, "WorkerNotFound", f"Worker {worker_id} not found.")
            if worker.owner_key != apikey:
                raise LocalHordeError(403, "WrongCredentials", "Only the owner can change this worker.")
            answer = {}
            if "maintenance" in body:
                worker.maintenance = bool(body["maintenance"])
                worker.maintenance_msg = str(body.get("maintenance_msg") or "")
                if not worker.maintenance:
                    worker.failures.clear()
                answer["maintenance"] = worker.maintenance
            return answer

    def model_stats(self) -> dict[str, Any]:
        with self.lock:
            counts = {m: self.usage.get(m, 0) for m in self.models}
            return {"day": dict(counts), "month": dict(counts), "total": dict(counts)}

    def models_status(self) -> list[dict[str, Any]]:
        with self.lock:
            now = time.time()
            out = []
            for model in self.models:
                workers = [w for w in self.workers.values() if model in w.models and now - w.last_pop < 300]
                queued = [r for r in self.requests.values() if model in r.body["models"] and r.pending > 0]
                out.append({"name": model, "count": len(workers), "type": "image", "eta": 0,
                            "jobs": float(sum(r.pending for r in queued)), "performance": 0.0,
                            "queued": float(sum(r.pending * int(r.params.get("width", 512))
                                                * int(r.params.get("height", 512)) for r in queued))})
            return out

    def unservable(self, worker_name: str) -> dict[str, str]:
        """Requests with images left that the named worker, as it last popped, will never be handed:
        request id -> why. Empty while anything it can take is waiting or being processed."""
        with self.lock:
            worker = next((w for w in self.workers.values() if w.name == worker_name), None)
            if worker is None:
                return {}
            body = {**worker.settings, "models": worker.models}
            out = {}
            for request in self.requests.values():
                if request.faulted or request.pending <= 0:
                    continue
                reason = unsuitable(request, body, worker.models)
                if reason is None:
                    return {}
                out[request.id] = reason
            if any(g.state == "processing" for g in self.generations.values()):
                return {}
            return out

    def all_done(self) -> bool:
        """True when every request has all its images (or has faulted for good)."""
        with self.lock:
            for request in self.requests.values():
                if request.faulted:
                    continue
                done = sum(1 for g in request.generation_ids if self.generations[g].state == "done")
                if done < int(request.params.get("n", 1)):
                    return False
            return True

    def counters(self) -> dict[str, Any]:
        """Internal counters for tests and the summary (not part of the horde API)."""
        with self.lock:
            return {
                "submits_received": self.submits_received,
                "duplicate_submits": self.duplicate_submits,
                "accepted_per_generation": {g.id: g.accepted_submits for g in self.generations.values()},
                "states": {g.id: g.state for g in self.generations.values()},
                "pending": sum(r.pending for r in self.requests.values()),
                "workers": {w.name: w.id for w in self.workers.values()},
            }
