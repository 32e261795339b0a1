"""``guideflow serve``: a Runware-compatible HTTP server in front of the engine.

``create_app(ServerConfig(...))`` builds the FastAPI app; the CLI runs it under
uvicorn. Modules: :mod:`.config` (settings), :mod:`.app` (routes, body limit,
lifespan), :mod:`.dispatch` (one batch: auth, validation, admission, answer),
:mod:`.executor` (running a task), :mod:`.jobs` (task records, admission),
:mod:`.storage` (expiring, byte-capped image store), :mod:`.openapi`, :mod:`.logs`.

Behaviour where Runware's docs are silent (decisions, kept stable):

* **Status codes.** 200 when any task produced a ``data`` item. When every task
  failed, the first of 401, 403, 413, 429, 400, 409, 404, 410, 503, 504, 502, 500 present
  among the errors. Body-level problems answer one error object without task
  fields: ``invalidJSON`` / ``invalidRequestBody`` (400), ``payloadTooLarge`` (413).
  ``invalidJSON`` also covers bodies that are not UTF-8, nest deeper than 32 levels
  or hold a string with a lone surrogate (``"\\ud800"``): valid JSON syntax, not text.
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
* **Job records hold no image data.** A record keeps the result fields, not an
  inline guide: for ``base64Data``/``dataURI`` answers only the guide's UUID in the
  image store, from whose bytes a replay or ``getResponse`` rebuilds the identical
  ``guideImageBase64Data``/``guideImageDataURI``. Records stay ~1.7 KB (error messages
  and webhook URLs clipped to 1024 characters), so ``max_jobs`` (default 100,000,
  about 170 MB) bounds their memory, and the image bytes stay under the store's
  ``ttl`` and ``storage_max_bytes``. When that guide image has expired or been evicted
  before the record, the result cannot be answered again and is never silently
  recomputed: a replay answers ``guideImageExpired`` (HTTP 410, parameter
  ``taskUUID``: resubmit under a new taskUUID), and ``getResponse`` answers HTTP 200
  with the item ``{"taskType", "taskUUID", "status": "error", "error": {...}}`` plus
  the error object in ``errors``, as for a failed task. URL answers are unaffected
  (their URL simply 404s once the image is gone).
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
  (the UUID is the capability, like Runware's image URLs). Inline inputs and
  guides answered inline (base64Data/dataURI) are written *behind* the answer by
  the store's own thread and served from memory until then; a guide answered by
  URL is on disk before the answer.
* **Server-Timing.** Every ``POST /v1`` answer carries ``Server-Timing: app;dur=<ms>``,
  the server's own time for it (body read to rendered answer), so a client can tell
  server work from network and client time (``bench/server_latency.py`` reports it).
* **Fault injection (TEST ONLY, off by default).** ``ServerConfig(faults=FaultConfig(...))``
  / ``guideflow serve --fault-rate R`` / ``--faults JSON`` answers that share of
  ``POST /v1`` requests with a 429 + ``Retry-After``, 500/502/503, a delay, a connection
  dropped mid-body, truncated JSON or one task's failed upload PUT; counters at
  ``GET /faults/stats`` (which exists only then). See :mod:`.faults`.
* **Error parameters.** Image errors name the field used (``inputImage`` or
  ``inputs.image``; ``image`` for imageUpload). Settings errors keep the engine's
  setting name (``lowThresholdCanny``, not ``settings.lowThresholdCanny``).
"""

from engine.server.app import create_app
from engine.server.config import ServerConfig, load_api_keys

__all__ = ["ServerConfig", "create_app", "load_api_keys"]
