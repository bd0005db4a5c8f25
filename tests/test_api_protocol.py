"""Request models and the OpenAPI document (`api/protocol.py`, `api/app.py`), without starting a server."""

from __future__ import annotations

import pytest

from step1x_edit.api.errors import APIError
from step1x_edit.api.protocol import (EditFormParams, GenerationRequest, form_to_fields, validate_model)

BASE = {"model": "stepfun-ai/step1x-edit", "prompt": "p", "image": "abc"}


def test_defaults_are_the_seeds():
    req = validate_model(GenerationRequest, BASE)
    assert (req.n, req.strength, req.seed, req.steps, req.guidance_scale, req.negative_prompt,
            req.response_format) == (1, 0.8, -1, 20, 2.5, "", "url")


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 5), ("n", 2.0), ("n", "2"), ("n", True),
    ("strength", -0.01), ("strength", 1.01), ("strength", "0.5"),
    ("seed", -2), ("seed", 2**63), ("seed", 1.5), ("seed", "7"),
    ("steps", 0), ("steps", 51), ("steps", 20.0),
    ("guidance_scale", 0.99), ("guidance_scale", 10.01), ("guidance_scale", False),
    ("response_format", "png"), ("negative_prompt", 3), ("prompt", ""), ("prompt", "   "), ("prompt", 5),
    ("model", None), ("image", ""), ("image", 1), ("stream", "true"), ("stream", 1),
    ("partial_images", 4), ("partial_images", -1), ("partial_images", 1.0), ("stream_progress", "yes"), ("size", 512), ("prompt", "x" * 9000),
])
def test_out_of_range_or_wrong_type_is_400_naming_the_field(field, value):
    with pytest.raises(APIError) as exc:
        validate_model(GenerationRequest, {**BASE, field: value})
    assert exc.value.status == 400 and f"'{field}'" in exc.value.message


@pytest.mark.parametrize("field,value", [
    ("n", 1), ("n", 4), ("strength", 0), ("strength", 1), ("seed", 0), ("seed", 2**63 - 1), ("seed", -1),
    ("steps", 1), ("steps", 50), ("guidance_scale", 1), ("guidance_scale", 10), ("response_format", "b64_json"),
    ("n", None), ("stream", False), ("stream", True), ("partial_images", 0), ("partial_images", 3),
    ("stream_progress", True), ("size", "auto"), ("user", "u-1"), ("quality", "high"), ("unknown", [1]),
])
def test_edges_and_ignored_extras_are_accepted(field, value):
    validate_model(GenerationRequest, {**BASE, field: value})


def test_size_picks_the_working_level():
    assert validate_model(GenerationRequest, {**BASE, "size": "768x768"}).size_level() == 768
    assert validate_model(GenerationRequest, {**BASE, "size": "auto"}).size_level() is None
    assert validate_model(GenerationRequest, {**BASE, "size": "1536x1024"}).size_level() is None


def test_missing_fields_are_named():
    for field in ("model", "prompt", "image"):
        body = {k: v for k, v in BASE.items() if k != field}
        with pytest.raises(APIError) as exc:
            validate_model(GenerationRequest, body)
        assert exc.value.message == f"Missing required field '{field}'"


def test_form_strings_become_typed_values():
    fields = form_to_fields({"prompt": " keep spaces ", "n": "2", "seed": "", "strength": "0.5",
                             "stream": "false", "guidance_scale": "3", "negative_prompt": "", "size": " auto ",
                             "mask": "ignored", "response_format": "b64_json"})
    assert fields == {"prompt": " keep spaces ", "n": 2, "seed": None, "strength": 0.5, "stream": False,
                      "guidance_scale": 3.0, "negative_prompt": None, "size": "auto",
                      "response_format": "b64_json"}
    params = validate_model(EditFormParams, fields)
    assert params.seed == -1 and params.negative_prompt == "" and params.model is None  # empty = the default


@pytest.mark.parametrize("field,value", [("n", "two"), ("n", "2.5"), ("steps", "1e3"), ("strength", "nan"),
                                         ("strength", "inf"), ("guidance_scale", "x"), ("stream", "maybe")])
def test_bad_form_values_are_400_naming_the_field(field, value):
    with pytest.raises(APIError) as exc:
        form_to_fields({"prompt": "p", field: value})
    assert exc.value.status == 400 and f"'{field}'" in exc.value.message


def test_openapi_documents_400_not_422_and_the_seed_ranges(tmp_path):
    from step1x_edit.api.app import create_app
    from step1x_edit.settings import Settings

    app = create_app(Settings(storage_dir=tmp_path))  # not started: the pipeline is never built
    doc = app.openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for op in item.values():
            assert "422" not in op["responses"], path
    gen = doc["paths"]["/v1/images/generations"]["post"]
    assert set(gen["responses"]) >= {"200", "400", "401", "404", "413", "429", "500", "503", "504"}
    props = doc["components"]["schemas"]["GenerationRequest"]["properties"]
    assert set(doc["components"]["schemas"]["GenerationRequest"]["required"]) == {"model", "prompt", "image"}
    n, steps = props["n"], props["steps"]
    assert (n["type"], n["minimum"], n["maximum"], n["default"]) == ("integer", 1, 4, 1)
    assert (steps["minimum"], steps["maximum"]) == (1, 50)
    form = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary"
    assert form["properties"]["guidance_scale"]["maximum"] == 10
    assert gen["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/v1/files/images/{name}"]["get"]
