"""``guideflow serve``: a Runware-compatible HTTP server in front of the engine.

``create_app(ServerConfig(...))`` builds the FastAPI app; the CLI runs it under
uvicorn. Modules: :mod:`.config` (settings), :mod:`.app` (routes, body limit,
lifespan), :mod:`.dispatch` (one batch: auth, validation, admission, answer),
:mod:`.executor` (running a task), :mod:`.jobs` (task records, admission),
:mod:`.storage` (expiring, byte-capped image store), :mod:`.openapi`, :mod:`.logs`.

Behaviour where Runware's docs are silent (decisions, kept stable):

* **Status codes.** 200 when any task produced a ``data`` item. When every task
  failed, the first of 401, 403, 413, 429, 400, 409, 404, 503, 504, 502, 500 present
  among the errors. Body-level problems answer one error object without task
  fields: ``invalidJSON`` / ``invalidRequestBody`` (400), ``payloadTooLarge`` (413).
* **Auth.** Every presented key (Bearer header and each ``authentication`` task's
  ``apiKey``) must be valid and at least one must be presented; otherwise 401 with
  one ``invalidApiKey`` error (parameter ``apiKey``) per task, ping included. The
  ``authentication`` task answers ``connectionSessionUUID`` (the one sent, else new).
* **Capacity.** Preprocess and imageUpload tasks that start a job count against
  ``queue_size`` until they finish (sync and async alike). A batch that does not
  fit is refused whole: 429, ``Retry-After``, code ``rateLimitExceeded`` per task.
* **Idempotency.** taskUUIDs of preprocess/upload tasks are remembered for
  ``job_ttl``: the same taskUUID twice in one batch → ``conflictTaskUUID`` for the
  repeats (409 if alone). A later request with the same taskUUID and the same
  payload replays the stored result (or joins the running job) without
  recomputing; a different payload → ``conflictTaskUUID``. A task that *failed*
  may be retried under the same taskUUID (it runs again).
* **Async.** The ack is ``{"taskType", "taskUUID", "status": "processing"}``.
  ``getResponse`` answers the result item plus ``"status": "success"``; for a
  failure a data item ``{"taskType", "taskUUID", "status": "error", "error":
  {code, message, parameter}}`` *and* the full error object in ``errors`` (HTTP 200:
  the poll itself succeeded). Unknown taskUUID → 404 ``taskNotFound``. Sync tasks
  are pollable too.
* **Webhooks.** The POST body is that same getResponse item (not wrapped in
  ``data``), for sync and async tasks, success or error. Non-2xx and connection
  errors are retried ``webhook_attempts`` times with ``webhook_backoff·2^n`` s
  delays; the outcome appears in getResponse as ``webhook: {url (redacted),
  status pending|delivered|failed, attempts, lastStatus}``.
* **uploadEndpoint.** The guide bytes are PUT (Content-Type of outputFormat)
  before the task answers; a failed PUT fails the task (``uploadFailed``, 502 when
  worth retrying, else 400). The response fields stay the usual ones.
* **Images.** Inline inputs (data URI, base64, URL) are stored too, so
  ``inputImageUUID`` always names a usable image. Uploads and inputs live
  ``upload_ttl`` after their last use; guide images ``ttl`` (the task's, else the
  config's), whatever the outputType, and are reusable as inputs by UUID. Files
  live on disk (``storage_dir``, default a private temp dir) under a total byte
  cap with oldest-first eviction; ``GET /image/<uuid>.<ext>`` needs no API key
  (the UUID is the capability, like Runware's image URLs).
* **Error parameters.** Image errors name the field used (``inputImage`` or
  ``inputs.image``; ``image`` for imageUpload). Settings errors keep the engine's
  setting name (``lowThresholdCanny``, not ``settings.lowThresholdCanny``).
"""

from engine.server.app import create_app
from engine.server.config import ServerConfig, load_api_keys

__all__ = ["ServerConfig", "create_app", "load_api_keys"]
