"""Typed errors that map one-to-one onto Runware-style error objects.

Every failure that a user can cause (a bad image, a bad setting, a missing
model) is raised as a :class:`GuideflowError`. The CLI prints it, the server
returns it inside ``{"errors": [...]}``, and the pipeline writes it into the
ledger; nobody ever sees a bare traceback for bad input.
"""

from __future__ import annotations

from typing import Any

DOCS_URL = "https://github.com/guideflow/guideflow#errors"


class GuideflowError(Exception):
    """Base error: a Runware error ``code``, a human ``message`` and the offending ``parameter``.

    ``http_status`` is the status a server answers with when this is the only
    error of a request; ``retryable`` tells clients and pipelines whether trying
    the same request again can succeed.
    """

    code: str = "internalError"
    http_status: int = 500
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        parameter: str | None = None,
        code: str | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        if retryable is not None:
            self.retryable = retryable

    def to_error_object(
        self, *, task_type: str | None = None, task_uuid: str | None = None
    ) -> dict[str, Any]:
        """The Runware error object: code, message, parameter, taskType, taskUUID, documentation.

        A transient failure (an upload endpoint that answered 503, a source URL that
        timed out) also carries ``"retryable": true`` so clients may resend the task;
        Runware's own objects have no such field, and clients that do not know it
        simply ignore it.
        """
        obj: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "parameter": self.parameter,
            "documentation": DOCS_URL,
        }
        if self.retryable:
            obj["retryable"] = True
        if task_type is not None:
            obj["taskType"] = task_type
        if task_uuid is not None:
            obj["taskUUID"] = task_uuid
        return obj

    def __str__(self) -> str:
        where = f" (parameter: {self.parameter})" if self.parameter else ""
        return f"{self.code}: {self.message}{where}"


class InvalidParameter(GuideflowError):
    """A setting is missing, of the wrong type, out of range, or does not apply."""

    code = "invalidParameter"
    http_status = 400


class InvalidPreProcessorType(GuideflowError):
    """The preprocessor name (or new-form model id) is not one we know."""

    code = "invalidPreProcessorType"
    http_status = 400


class InvalidImage(GuideflowError):
    """The input bytes are not a decodable image (empty, truncated, corrupt)."""

    code = "invalidImage"
    http_status = 400


class UnsupportedImageFormat(GuideflowError):
    """The input is a recognisable file, but not an image format we decode (SVG, TIFF...)."""

    code = "unsupportedImageFormat"
    http_status = 400


class ImageTooLarge(GuideflowError):
    """The input exceeds the pixel or byte limit (decompression-bomb guard)."""

    code = "imageTooLarge"
    http_status = 400


class ModelUnavailable(GuideflowError):
    """Model weights cannot be found locally and cannot be downloaded."""

    code = "modelUnavailable"
    http_status = 503


class ModelCorrupt(GuideflowError):
    """Model weights exist but fail their sha256 check or do not load."""

    code = "modelCorrupt"
    http_status = 500
