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

`loras` (this server's extension) is the one structured field: a list of `{"name", "scale"}` objects. In a multipart
form it travels as JSON text (`loras=[{"name": "fix-hand", "scale": 0.8}]`) or, as the `openai` SDK flattens
`extra_body` into a form, as `loras[][name]` / `loras[][scale]` fields (`form_lists`).
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import MODEL_ID
from ..pipeline.types import (DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH, MAX_LORA_SCALE, MAX_LORAS,
                              MAX_SEED, EditRequest, LoraChoice)
from .errors import bad_request, describe_validation_errors
from .images import OutputFormat

SEED_MAX = MAX_SEED
MAX_PROMPT_CHARS = 8192
# `size` values that pick the working area (StepFun's platform convention for this model); others are ignored.
SIZE_LEVELS = {"512x512": 512, "768x768": 768, "1024x1024": 1024}


class _NullIsDefault(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """`"n": null` (some clients send every field) means the default, as an absent field does."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields
                                                          and not cls.model_fields[k].is_required())}
        return data


class LoraRef(_NullIsDefault):
    """One LoRA adapter for the request. Unknown keys are refused here (a misspelt `scale` would silently be 1)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256,
                      description="The adapter's name, as GET /v1/models lists it under `loras`")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False,
                         description=f"How strongly it applies, in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]; "
                                     "0 = not at all")


class EditParams(_NullIsDefault):
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
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS,
                                 description=f"This server's extension: up to {MAX_LORAS} LoRA adapters on the "
                                             "diffusion transformer, e.g. `[{\"name\": \"fix-hand\", \"scale\": "
                                             "0.8}]` (names: GET /v1/models)")

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
                           partial_images=self.partial_images if self.stream else 0,
                           loras=tuple(LoraChoice(ref.name, ref.scale) for ref in self.loras))


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


class LoraCard(BaseModel):
    name: str = Field(description="What a request's `loras` names it by")
    format: str = Field(description="`kohya` (the official training script's layout) or `peft` (diffusers)")
    rank: int
    layers: int = Field(description="DiT layers it changes")


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
    loras: list[LoraCard] = Field(default_factory=list, description="LoRA adapters a request may name (`loras`)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- multipart -----------------------------------------------------------------------------------------------------
# ASCII digits only: `int()` and `float()` also take other scripts' digits ("\u0662" is 2) and `1_000`.
_INT = re.compile(r"^[+-]?[0-9]{1,30}$")
_FLOAT = re.compile(r"^[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,4})?$")
_KEEP_SPACES = ("prompt", "negative_prompt")  # text whose spaces matter; other strings are stripped


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """`list[SomeModel]` -> SomeModel: a structured field (JSON text in a form); None for plain fields."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


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
        elif _item_model(kind) is not None:  # a structured field (a list of objects) travels as JSON text
            try:
                out[name] = json.loads(value)
            except (ValueError, RecursionError):
                raise bad_request(f"Invalid value for '{name}': expected JSON text such as "
                                  f"[{{\"name\": \"fix-hand\", \"scale\": 0.8}}], got {raw[:40]!r}") from None
        else:
            raise bad_request(f"Field '{name}' cannot be sent in a form")
    return out


_BRACKETS = re.compile(r"^([A-Za-z_]+)\[\]\[([A-Za-z_]+)\]$")


def form_lists(items: list[tuple[str, Any]], model: type[BaseModel] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The structured fields sent as `field[][key]` form fields, the way the `openai` SDK flattens `extra_body` lists
    into a multipart form. The SDK groups the fields by key (`loras[][name]=a`, `loras[][name]=b`,
    `loras[][scale]=0.8`, `loras[][scale]=1`), so item i is made of the i-th value of each key, and every key must
    come once per item (otherwise which item a value belongs to is unknown: a 400). Values are typed by the item
    model's declared types (`form_to_fields`); keys it does not declare are kept, so that validation names them."""
    fields = (model or EditFormParams).model_fields
    found: dict[str, dict[str, list[str]]] = {}
    for key, value in items:
        m = _BRACKETS.match(key)
        if not m or not isinstance(value, str) or m[1] not in fields or _item_model(fields[m[1]].annotation) is None:
            continue
        found.setdefault(m[1], {}).setdefault(m[2], []).append(value)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, columns in found.items():
        counts = {len(values) for values in columns.values()}
        if len(counts) > 1:
            sent = ", ".join(f"{len(v)} '{name}[][{k}]'" for k, v in columns.items())
            raise bad_request(f"Invalid value for '{name}': got {sent}; in a form each key must be sent once per "
                              "item (e.g. give every adapter a scale)")
        item = _item_model(fields[name].annotation)
        assert item is not None
        objects = [{k: values[i] for k, values in columns.items()} for i in range(counts.pop())]
        out[name] = [{**{k: v for k, v in obj.items() if k not in item.model_fields}, **form_to_fields(obj, item)}
                     for obj in objects]
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
        if _item_model(EditFormParams.model_fields[name].annotation) is not None:  # JSON text in a form
            prop = {"type": "string", "contentMediaType": "application/json", "title": prop.get("title", name),
                    "description": prop.get("description", "") + "; in a form: JSON text, or "
                                   f"`{name}[][key]` fields as the openai SDK sends them"}
        props[name] = prop
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["prompt"], "properties": props,
        "description": "Send the image as `image` (or `image[]`)"}}}}}
