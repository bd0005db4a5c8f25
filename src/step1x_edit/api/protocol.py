"""The hosted API's request and response bodies (as vLLM's `protocol.py`): each request field declared once here.

`EditParams` declares every edit field once — type, default, range, description — and everything else derives from
it: the JSON endpoint's validation and OpenAPI schema, the multipart endpoint's typed conversion
(`form_to_fields`, from the field types) and its OpenAPI form (`edit_form_openapi`), and the pipeline's request
(`to_edit_request`). Validation is strict — a string where a number belongs, `4.0` for `n`, or an out-of-range
value is a 400, never coerced or clamped (design.md); an explicit `null` means "the default".

Fields other OpenAI clients send and this model has no use for are ignored: `size` values other than
`512x512`/`768x768`/`1024x1024` (e.g. `auto`), `user`, `quality`, `style`, `background`, `moderation`,
`input_fidelity`, `safety_identifier`, `mask` (edits), and any other unknown field. `output_format` and
`output_compression` (OpenAI's) pick the encoding of the outputs (api/images.py `encode_image`). `stream: true`
(with `partial_images` 0-3 and this server's `stream_progress`) answers with server-sent events instead of JSON
(api/streaming.py).
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import MODEL_ID
from ..pipeline.types import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH, MAX_SEED, EditRequest
from .errors import bad_request, describe_validation_errors
from .images import OutputFormat

SEED_MAX = MAX_SEED
MAX_PROMPT_CHARS = 8192
# `size` values that pick the working area (StepFun's platform convention for this model); others are ignored.
SIZE_LEVELS = {"512x512": 512, "768x768": 768, "1024x1024": 1024}


class EditParams(BaseModel):
    """Everything except `model` and `image`: shared by the JSON and the multipart endpoints."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S",
                        description="Prompt word: the edit instruction (not blank)")
    n: int = Field(1, ge=1, le=4, description="The number of images generated, ranging from 1 to 4")
    strength: float = Field(DEFAULT_STRENGTH, ge=0, le=1, allow_inf_nan=False,
                            description="The degree of transformation referenced by the image, from 0 to 1")
    seed: int = Field(-1, ge=-1, le=SEED_MAX,
                      description="Random seed; -1 = random (drawn below 2^53 so JavaScript clients can replay it). "
                                  "Image i of a request uses seed + i; the response reports each image's seed.")
    steps: int = Field(DEFAULT_STEPS, ge=1, le=50, description="Number of inference steps, from 1 to 50")
    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=1, le=10, allow_inf_nan=False,
                                  description="Consistency between output and prompt, in [1, 10]; "
                                              "1 turns classifier-free guidance off")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                 description="Content you do not wish to appear in the generated image")
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="`url` (a signed link valid for 7 days by default) or `b64_json`")
    size: str | None = Field(None, max_length=64,
                             description="`512x512`, `768x768` or `1024x1024` picks the working area; "
                                         "other values (e.g. `auto`) are ignored")
    output_format: OutputFormat = Field(
        "png", description="Format of the output images (links, b64_json and stream events alike)")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="0-100: the JPEG/WebP quality (default 100, as in OpenAI's API; lower = "
                                        "smaller files); ignored for png, which is lossless (as in OpenAI's API)")
    stream: bool = Field(False, description="true: answer with server-sent events (`text/event-stream`): "
                         "`partial_images` previews, then one `.completed` event per image (see the README)")
    partial_images: int = Field(0, ge=0, le=3,
                                description="With stream=true: previews of the current prediction sent while "
                                            "denoising (0-3, evenly spaced steps; a short run may send fewer)")
    stream_progress: bool = Field(False, description="With stream=true (this server's extension): also send "
                                  "an `image_generation.progress` / `image_edit.progress` event per step")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`"n": null` (some clients send every field) means the default, as an absent field does."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields
                                                          and not cls.model_fields[k].is_required())}
        return data

    def size_level(self) -> int | None:
        return SIZE_LEVELS.get((self.size or "").strip().lower())

    def expected_steps(self) -> int:
        """Denoising steps the job will run (img2img starts at index int((1 - strength) * steps))."""
        return self.steps - int((1 - self.strength) * self.steps) if self.strength < 1 else self.steps

    def to_edit_request(self, image: Image.Image) -> EditRequest:
        """The pipeline's request (fields that only shape the HTTP answer stay here)."""
        return EditRequest(image=image, prompt=self.prompt, negative_prompt=self.negative_prompt, n=self.n,
                           steps=self.steps, guidance_scale=self.guidance_scale, strength=self.strength,
                           seed=self.seed, size_level=self.size_level(),
                           partial_images=self.partial_images if self.stream else 0)


class GenerationRequest(EditParams):
    """POST /v1/images/generations: the seed's request body."""

    # Any string validates here (the handler answers an unknown model with 404, as OpenAI does); the schema
    # names the one accepted value so that fuzzers treat other names as invalid input.
    model: str = Field(description=f"The model name used for this request: {MODEL_ID}",
                       json_schema_extra={"enum": [MODEL_ID]})
    image: str = Field(min_length=1, description="Base64 data (bare or a data URI) or an http(s) image link")

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"example": {
        "model": MODEL_ID, "prompt": "Convert to quick pencil sketch",
        "image": "data:image/png;base64,iVBORw0KGgo...", "negative_prompt": "blurry, low quality"}})


class EditFormParams(EditParams):
    """POST /v1/images/edits fields besides the image file(s); `model` is optional there as in OpenAI's API."""

    model: str | None = Field(None, description=f"The model name; {MODEL_ID} when omitted",
                              json_schema_extra={"enum": [MODEL_ID]})


# --- responses ---------------------------------------------------------------------------------------------------
class ImageData(BaseModel):
    url: str | None = Field(None, description="Signed link to the image (response_format=url)")
    b64_json: str | None = Field(None, description="The image in base64 (response_format=b64_json)")
    seed: int = Field(description="The seed this image used (reproduces it alone)")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    input_tokens: int = Field(description="Encoder input tokens, text and image")
    input_tokens_details: InputTokensDetails
    output_tokens: int = 0
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix timestamp (seconds) of when the request was created")
    data: list[ImageData]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    version: str | None = Field(None, description="Weights version: v1.0 or v1.1")
    preset: str = Field(description="`dev` (tiny random weights: outputs are noise) or `full`")
    dev_preset: bool
    ready: bool
    device: str | None = None
    dtype: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- multipart -----------------------------------------------------------------------------------------------------
# ASCII digits only: `int()` and `float()` also take other scripts' digits ("\u0662" is 2) and `1_000`.
_INT = re.compile(r"^[+-]?[0-9]{1,30}$")
_FLOAT = re.compile(r"^[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?$")
_KEEP_SPACES = ("prompt", "negative_prompt")  # text whose spaces matter; other strings are stripped


def _kind(annotation: Any) -> Any:
    """`X | None` -> X; `Literal["a", "b"]` -> str."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def form_to_fields(form: dict[str, str], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Typed values from multipart strings, by the types `model` declares (default `EditFormParams`): `""` is null
    (the default), `true/false/1/0` are booleans, numbers must parse completely. Unknown fields are dropped."""
    fields = (model or EditFormParams).model_fields
    out: dict[str, Any] = {}
    for name, raw in form.items():
        if name not in fields:
            continue
        kind = _kind(fields[name].annotation)
        value = raw.strip()
        if value == "" and name != "prompt":
            out[name] = None
        elif kind is str:
            out[name] = raw if name in _KEEP_SPACES else value
        elif kind is bool:
            if value.lower() in ("true", "1"):
                out[name] = True
            elif value.lower() in ("false", "0"):
                out[name] = False
            else:
                raise bad_request(f"Invalid value for '{name}': expected true or false, got {raw[:40]!r}")
        elif kind is int:
            if not _INT.match(value):
                raise bad_request(f"Invalid value for '{name}': expected an integer, got {raw[:40]!r}")
            out[name] = int(value)
        elif kind is float:
            if not _FLOAT.match(value):
                raise bad_request(f"Invalid value for '{name}': expected a number, got {raw[:40]!r}")
            number = float(value)
            if not math.isfinite(number):  # 1e999
                raise bad_request(f"Invalid value for '{name}': expected a finite number")
            out[name] = number
        else:  # a structured field (a list of objects) travels as JSON text in a form
            raise bad_request(f"Field '{name}' cannot be sent in a form")
    return out


def validate_model(model_cls: type[BaseModel], data: Any) -> Any:
    """`model_cls.model_validate` with pydantic errors turned into our 400."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        message, code = describe_validation_errors(list(exc.errors()))
        raise bad_request(message, code=code) from None


def edit_form_openapi() -> dict[str, Any]:
    """The multipart request body of /v1/images/edits for the OpenAPI document (the handler parses it by hand)."""
    props: dict[str, Any] = {
        "image": {"type": "string", "format": "binary", "description": "The input image (PNG, JPEG or WebP)"},
        "image[]": {"type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": 1,
                    "description": "The input image, as `client.images.edit(image=[...])` sends it (one image)"},
    }
    schema = EditFormParams.model_json_schema()
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        if "anyOf" in prop:  # `X | None`: a form field is a plain value; empty means "default"
            variants = [v for v in prop.pop("anyOf") if v.get("type") != "null"]
            prop.update(variants[0])
        props[name] = prop
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["prompt"], "properties": props,
        "description": "Send the image as `image` (or `image[]`)"}}}}}
