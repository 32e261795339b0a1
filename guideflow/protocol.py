"""The Runware protocol as one set of typed models, shared by client, server and pipeline.

``POST /v1`` takes a JSON array of tasks and answers ``{"data": [...], "errors": [...]}``.
This module models every task guideflow speaks (``controlNetPreprocess`` in both its
legacy and new forms, ``imageUpload``, ``getResponse``, ``ping``, ``authentication``),
their result items and the error object, so that the server's OpenAPI document, the
client's requests and the pipeline's ledger all come from the same definitions.

The two request forms are equivalent::

    {"taskType": "imageControlNetPreProcess", "taskUUID": ..., "inputImage": ...,
     "preProcessorType": "canny", "lowThresholdCanny": 50}
    {"taskType": "controlNetPreprocess", "taskUUID": ..., "model":
     "runware:controlnet-preprocess@canny", "inputs": {"image": ...},
     "settings": {"lowThresholdCanny": 50}}
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from guideflow.errors import DOCS_URL, GuideflowError, InvalidParameter

#: Legacy and current spellings of the preprocess task type; responses use either.
PREPROCESS_TASK_TYPES: tuple[str, ...] = ("controlNetPreprocess", "imageControlNetPreProcess")
MODEL_ID_PREFIX = "runware:controlnet-preprocess@"

#: Runware's settings that the legacy form writes as top-level fields.
LEGACY_SETTING_FIELDS: tuple[str, ...] = (
    "lowThresholdCanny",
    "highThresholdCanny",
    "includeHandsAndFaceOpenPose",
)

OutputType = Literal["URL", "base64Data", "dataURI"]
OutputFormat = Literal["JPG", "PNG", "WEBP"]
DeliveryMethod = Literal["sync", "async"]
TaskStatus = Literal["processing", "success", "error"]


def _check_uuid4(value: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ValueError("must be a UUID v4 string") from None
    if parsed.version != 4 or str(parsed) != value.lower():
        raise ValueError("must be a UUID v4 string in canonical 8-4-4-4-12 form")
    return value


def _upper(value: Any) -> Any:
    if isinstance(value, str):
        upper = value.strip().upper()
        return "JPG" if upper == "JPEG" else upper
    return value


UUID4 = Annotated[str, AfterValidator(_check_uuid4)]
Format = Annotated[OutputFormat, BeforeValidator(_upper)]


def new_task_uuid() -> str:
    """A random UUID v4 for a new task."""
    return _uuid4_text(os.urandom(16))


def stable_task_uuid(*parts: str) -> str:
    """A deterministic UUID v4 (version/variant bits set) derived from ``parts``.

    The pipeline derives each task's UUID from (image id, preprocessor, settings
    hash), so a retried or resumed task keeps its identity (and its seeded output).
    """
    return _uuid4_text(hashlib.sha256("\x1f".join(parts).encode()).digest())


def _uuid4_text(raw: bytes) -> str:
    """The first 16 bytes of ``raw`` as a canonical UUID v4 string.

    Equal to ``str(uuid.UUID(bytes=raw[:16], version=4))`` (the tests check it) at a
    third of the cost: the pipeline makes one or two per image.
    """
    b = bytearray(raw[:16])
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class ProtocolModel(BaseModel):
    """Base for request tasks: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def wire(self) -> dict[str, Any]:
        """The JSON-able dict as sent on the wire (unset optional fields omitted)."""
        return self.model_dump(mode="json", exclude_none=True)


class ResultModel(BaseModel):
    """Base for response items: unknown fields are kept (servers may add some)."""

    model_config = ConfigDict(extra="allow")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class ErrorObject(ResultModel):
    """Runware's error object; ``errors`` holds one per failed task."""

    code: str
    message: str
    parameter: str | None = None
    taskType: str | None = None
    taskUUID: str | None = None
    documentation: str | None = None

    @classmethod
    def from_exception(
        cls, exc: GuideflowError, *, task_type: str | None = None, task_uuid: str | None = None
    ) -> ErrorObject:
        return cls(**exc.to_error_object(task_type=task_type, task_uuid=task_uuid))


# -- controlNetPreprocess --------------------------------------------------------------------


class PreprocessInputs(ProtocolModel):
    """The new form's ``inputs``: the image as a UUID, data URI, base64 or URL."""

    image: str = Field(min_length=1)


class PreprocessTask(ProtocolModel):
    """One ``controlNetPreprocess`` task, in either request form.

    Exactly one of ``inputImage`` (legacy) / ``inputs.image`` (new) and one of
    ``preProcessorType`` (legacy) / ``model`` (new) must be given. Settings come from
    the legacy top-level fields and from ``settings``; see :meth:`engine_settings`.
    """

    taskType: Literal["controlNetPreprocess", "imageControlNetPreProcess"] = "controlNetPreprocess"
    taskUUID: UUID4
    # legacy form
    inputImage: str | None = Field(None, min_length=1)
    preProcessorType: str | None = None
    lowThresholdCanny: StrictInt | None = None
    highThresholdCanny: StrictInt | None = None
    includeHandsAndFaceOpenPose: StrictBool | None = None
    # new form
    model: str | None = None
    inputs: PreprocessInputs | None = None
    settings: dict[str, Any] | None = None
    # common
    height: StrictInt | None = Field(None, ge=1, le=16384)
    width: StrictInt | None = Field(None, ge=1, le=16384)
    outputType: OutputType = "URL"
    outputFormat: Format = "JPG"
    outputQuality: StrictInt = Field(95, ge=20, le=99)
    webhookURL: str | None = None
    deliveryMethod: DeliveryMethod = "sync"
    uploadEndpoint: str | None = None
    ttl: StrictInt | None = Field(None, ge=60)
    includeCost: StrictBool = False

    @model_validator(mode="after")
    def _one_form(self) -> PreprocessTask:
        image_ref = self.inputs.image if self.inputs else None
        if (self.inputImage is None) == (image_ref is None):
            raise ValueError(
                "give the image exactly once: inputImage (legacy form) or inputs.image (new form)"
            )
        if (self.preProcessorType is None) == (self.model is None):
            raise ValueError(
                "name the preprocessor exactly once: preProcessorType (legacy form) "
                f"or model '{MODEL_ID_PREFIX}<name>' (new form)"
            )
        return self

    @property
    def image(self) -> str:
        """The image reference, whichever form carried it."""
        if self.inputs is not None:
            return self.inputs.image
        assert self.inputImage is not None
        return self.inputImage

    @property
    def preprocessor(self) -> str:
        """The preprocessor name or model id as given (the engine canonicalises it)."""
        return self.model if self.model is not None else str(self.preProcessorType)

    @property
    def preprocessor_parameter(self) -> str:
        return "model" if self.model is not None else "preProcessorType"

    def engine_settings(self) -> dict[str, Any]:
        """Settings for the engine: the legacy top-level fields merged with ``settings``.

        A setting given both ways is an error rather than a silent override.
        """
        merged: dict[str, Any] = {}
        for name in LEGACY_SETTING_FIELDS:
            value = getattr(self, name)
            if value is not None:
                merged[name] = value
        for key, value in (self.settings or {}).items():
            if key in merged:
                raise InvalidParameter(
                    f"'{key}' was given both as a top-level field and in settings",
                    parameter=f"settings.{key}",
                )
            merged[key] = value
        return merged

    @classmethod
    def build(
        cls,
        preprocessor: str,
        image: str,
        *,
        form: Literal["new", "legacy"] = "new",
        settings: Mapping[str, Any] | None = None,
        task_uuid: str | None = None,
        **fields: Any,
    ) -> PreprocessTask:
        """Build a task in either form from a preprocessor name and an image reference."""
        name = preprocessor.removeprefix(MODEL_ID_PREFIX)
        task_uuid = task_uuid or new_task_uuid()
        if form == "new":
            return cls(
                taskType="controlNetPreprocess",
                taskUUID=task_uuid,
                model=MODEL_ID_PREFIX + name.replace("_", "-"),
                inputs=PreprocessInputs(image=image),
                settings=dict(settings) if settings else None,
                **fields,
            )
        extra = dict(settings or {})
        legacy = {k: extra.pop(k) for k in LEGACY_SETTING_FIELDS if k in extra}
        return cls(
            taskType="imageControlNetPreProcess",
            taskUUID=task_uuid,
            inputImage=image,
            preProcessorType=name.replace("-", "_"),
            settings=extra or None,
            **legacy,
            **fields,
        )


@dataclass(frozen=True, slots=True)
class StampedTask:
    """A preprocess task already in wire form: what :meth:`TaskTemplate.stamp` makes.

    It quacks like :class:`PreprocessTask` where a client needs it (``taskUUID``,
    ``deliveryMethod``, :meth:`wire`), without re-validating per task what the
    template validated once.
    """

    taskUUID: str
    deliveryMethod: str
    body: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        return self.body


class TaskTemplate:
    """Many preprocess tasks that differ only in taskUUID, image and uploadEndpoint.

    A pipeline sends thousands of tasks that share preprocessor, settings and output
    fields. Building and dumping a pydantic model per task cost more CPU than sending
    it; a template is one :class:`PreprocessTask`, validated once, whose wire dict is
    copied with the three per-task values filled in. Those are checked where the check
    is cheap and matters (a UUID v4 in canonical form, a non-empty image reference);
    the template refuses fields whose validity could depend on them.
    """

    __slots__ = ("_body", "_delivery", "_inputs", "_new_form")

    def __init__(self, task: PreprocessTask) -> None:
        body = task.wire()
        body.pop("taskUUID", None)
        body.pop("uploadEndpoint", None)
        self._new_form = task.inputs is not None
        self._inputs: dict[str, Any] = body.pop("inputs", None) or {}
        body.pop("inputImage", None)
        self._body = body
        self._delivery = task.deliveryMethod

    @classmethod
    def build(cls, preprocessor: str, **fields: Any) -> TaskTemplate:
        """Validate the shared fields as :meth:`PreprocessTask.build` would, with a placeholder
        image, UUID and (when given) upload endpoint."""
        fields.setdefault("task_uuid", _TEMPLATE_UUID)
        return cls(PreprocessTask.build(preprocessor, "template", **fields))

    def stamp(self, task_uuid: str, image: str, upload_endpoint: str | None = None) -> StampedTask:
        """The task for one image: a fresh wire dict (its settings and inputs are copies too)."""
        if _UUID4_CANONICAL.fullmatch(task_uuid) is None:
            raise ValueError(f"taskUUID must be a UUID v4 string in canonical form: {task_uuid!r}")
        if not image:
            raise ValueError("a task needs a non-empty image reference")
        body = {"taskUUID": task_uuid, **self._body}
        if "settings" in body:
            body["settings"] = dict(body["settings"])
        if self._new_form:
            body["inputs"] = {**self._inputs, "image": image}
        else:
            body["inputImage"] = image
        if upload_endpoint is not None:
            body["uploadEndpoint"] = upload_endpoint
        return StampedTask(task_uuid, self._delivery, body)


_TEMPLATE_UUID = "00000000-0000-4000-8000-000000000000"
_UUID4_CANONICAL = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)


class PreprocessResult(ResultModel):
    """One result item of a preprocess task (either response spelling)."""

    taskType: str = "controlNetPreprocess"
    taskUUID: str
    status: TaskStatus | None = None
    guideImageUUID: str | None = None
    inputImageUUID: str | None = None
    guideImageURL: str | None = None
    guideImageBase64Data: str | None = None
    guideImageDataURI: str | None = None
    cost: float | None = None

    @property
    def is_complete(self) -> bool:
        """Finished successfully: ``status == "success"`` or a guide image is present.

        (Runware's own SDK only looks for ``imageURL`` and so never sees preprocess
        results finish; this checks the guide image fields.)
        """
        return self.status == "success" or any(
            (self.guideImageURL, self.guideImageBase64Data, self.guideImageDataURI)
        )

    def guide_bytes(self) -> bytes | None:
        """The guide image's bytes when it came inline (base64 or data URI)."""
        if self.guideImageBase64Data:
            return base64.b64decode(self.guideImageBase64Data)
        if self.guideImageDataURI:
            return base64.b64decode(self.guideImageDataURI.partition(",")[2])
        return None


# -- utility tasks ---------------------------------------------------------------------------


class ImageUploadTask(ProtocolModel):
    """``imageUpload``: store an image once and refer to it by UUID afterwards."""

    taskType: Literal["imageUpload"] = "imageUpload"
    taskUUID: UUID4
    image: str = Field(min_length=1)


class ImageUploadResult(ResultModel):
    taskType: str = "imageUpload"
    taskUUID: str
    imageUUID: str
    imageURL: str | None = None


class GetResponseTask(ProtocolModel):
    """``getResponse``: poll the results of an async task."""

    taskType: Literal["getResponse"] = "getResponse"
    taskUUID: UUID4


class PingTask(ProtocolModel):
    taskType: Literal["ping"] = "ping"
    ping: StrictBool = True
    taskUUID: UUID4 | None = None


class PongResult(ResultModel):
    taskType: str = "ping"
    pong: bool = True
    taskUUID: str | None = None


class AuthenticationTask(ProtocolModel):
    """A leading ``authentication`` task, the alternative to the ``Authorization`` header."""

    taskType: Literal["authentication"] = "authentication"
    apiKey: str
    connectionSessionUUID: str | None = None

    def __repr__(self) -> str:  # never show the key
        return "AuthenticationTask(apiKey='***')"


class AuthenticationResult(ResultModel):
    taskType: str = "authentication"
    connectionSessionUUID: str


Task = Annotated[
    PreprocessTask | ImageUploadTask | GetResponseTask | PingTask | AuthenticationTask,
    Field(discriminator="taskType"),
]
TASK_ADAPTER: TypeAdapter[Any] = TypeAdapter(Task)
TASK_TYPES: tuple[str, ...] = (
    *PREPROCESS_TASK_TYPES,
    "imageUpload",
    "getResponse",
    "ping",
    "authentication",
)


class ApiResponse(BaseModel):
    """The response envelope: results and per-task errors side by side."""

    data: list[dict[str, Any]] = Field(default_factory=list)
    errors: list[ErrorObject] = Field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.data or not self.errors:
            out["data"] = self.data
        if self.errors:
            out["errors"] = [e.wire() for e in self.errors]
        return out


# -- parsing ---------------------------------------------------------------------------------


def _parameter_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    # drop the discriminator tag pydantic puts first ("controlNetPreprocess", ...)
    if parts and parts[0] in TASK_TYPES:
        parts = parts[1:]
    return ".".join(parts) or None


def error_from_validation(
    exc: ValidationError, *, task_type: str | None, task_uuid: str | None
) -> ErrorObject:
    """The first pydantic error as a Runware error object naming the parameter."""
    first = exc.errors()[0]
    parameter = _parameter_of(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "missing":
        code, message = "missingParameter", f"'{parameter}' is required"
    elif kind == "extra_forbidden":
        code, message = "invalidParameter", f"'{parameter}' is not a parameter of {task_type}"
    else:
        code = "invalidParameter"
        detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{parameter}: {detail}" if parameter else detail
    if parameter == "taskUUID" and code == "invalidParameter":
        code = "invalidTaskUUID"
    return ErrorObject(
        code=code,
        message=message,
        parameter=parameter,
        taskType=task_type,
        taskUUID=task_uuid,
        documentation=DOCS_URL,
    )


def parse_task(raw: Any) -> Any:
    """Validate one raw task object into its model, or raise :class:`ProtocolError`."""
    if not isinstance(raw, dict):
        raise ProtocolError(
            ErrorObject(
                code="invalidParameter",
                message="each task must be a JSON object",
                parameter="taskType",
                documentation=DOCS_URL,
            )
        )
    task_type = raw.get("taskType")
    task_uuid = raw.get("taskUUID") if isinstance(raw.get("taskUUID"), str) else None
    if task_type not in TASK_TYPES:
        raise ProtocolError(
            ErrorObject(
                code="invalidTaskType" if task_type is not None else "missingParameter",
                message=f"unsupported taskType {task_type!r}; expected one of "
                + ", ".join(TASK_TYPES),
                parameter="taskType",
                taskType=task_type if isinstance(task_type, str) else None,
                taskUUID=task_uuid,
                documentation=DOCS_URL,
            )
        )
    try:
        return TASK_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise ProtocolError(
            error_from_validation(exc, task_type=task_type, task_uuid=task_uuid)
        ) from None


class ProtocolError(Exception):
    """A task that does not validate; carries the Runware error object to answer with."""

    def __init__(self, error: ErrorObject) -> None:
        super().__init__(error.message)
        self.error = error


def parse_result(item: Mapping[str, Any]) -> Any:
    """A response item as its typed result model (unknown task types stay plain dicts)."""
    task_type = item.get("taskType")
    if task_type in PREPROCESS_TASK_TYPES or "guideImageUUID" in item:
        return PreprocessResult.model_validate(item)
    if task_type == "imageUpload":
        return ImageUploadResult.model_validate(item)
    if task_type == "ping":
        return PongResult.model_validate(item)
    if task_type == "authentication":
        return AuthenticationResult.model_validate(item)
    return dict(item)
