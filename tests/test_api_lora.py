"""LoRA adapters through the HTTP API (a real server, dev preset, adapter files made by the test): listing, choosing
them per request through both endpoints and the `openai` SDK, and clear 400s for bad choices."""

from __future__ import annotations

import base64
import json
import os
import sys

import httpx
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from lora_fixtures import dev_preset_loras, one_thread, save  # noqa: E402,F401
from server_fixtures import KEY, data_uri, dev_settings, png_bytes, start_server  # noqa: E402

MODEL = "stepfun-ai/step1x-edit"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):  # noqa: F811 - the fixture imported above
    loras = dev_preset_loras(tmp_path_factory.mktemp("loras"))
    save({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)},
         loras / "broken.safetensors")
    srv = start_server(dev_settings(tmp_path_factory.mktemp("lora-api"), api_keys=KEY, lora_dir=loras))
    yield srv
    srv.stop()


def generate(server, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "add a hat", "image": data_uri(), "steps": 1, "seed": 5,
            "response_format": "b64_json", **fields}
    return httpx.post(server.api + "/images/generations", json=body, headers=AUTH, timeout=120)


def image_of(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text[:300]
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def error_of(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error["message"]


def test_models_lists_the_adapters_it_can_use(server):
    card = httpx.get(server.api + "/models", headers=AUTH, timeout=30).json()["data"][0]
    assert card["loras"] == [{"name": "fix-hand", "format": "kohya", "rank": 8, "layers": 40},
                             {"name": "sketch", "format": "kohya", "rank": 8, "layers": 40}]
    assert httpx.get(server.api + f"/models/{MODEL}", headers=AUTH, timeout=30).json()["loras"] == card["loras"]


def test_adapters_apply_to_their_request_only(server):
    base = image_of(generate(server))
    adapted = image_of(generate(server, loras=[{"name": "fix-hand", "scale": 0.8}]))
    assert adapted != base
    assert image_of(generate(server)) == base  # the next request has no trace of it
    assert image_of(generate(server, loras=[{"name": "fix-hand", "scale": 0}])) == base
    assert image_of(generate(server, loras=[{"name": "fix-hand", "scale": 0.8}])) == adapted
    assert image_of(generate(server, loras=[{"name": "sketch"}, {"name": "fix-hand", "scale": 0.8}])) not in (
        base, adapted)
    assert image_of(generate(server, loras=None)) == base  # (null: the default, none)


@pytest.mark.parametrize("loras, expected", [
    ([{"name": "nope"}], "loras: unknown adapter 'nope'; available: fix-hand, sketch"),
    ([{"name": "../fix-hand"}], "loras: unknown adapter '../fix-hand'; available: fix-hand, sketch"),
    ([{"name": "fix-hand.safetensors"}], "loras: unknown adapter"),
    ([{"name": "broken"}], "loras: adapter 'broken' cannot be used: "),
    ([{"name": "fix-hand", "scale": 4.5}], "Invalid value for 'loras.0.scale'"),
    ([{"name": "fix-hand", "scal": 1}], "Invalid value for 'loras.0.scal'"),
    ([{"scale": 1}], "Missing required field 'loras.0.name'"),
    ([{"name": "fix-hand"}, {"name": "fix-hand"}], "loras: adapter 'fix-hand' is named more than once"),
    ([{"name": "fix-hand"}] * 5, "Invalid value for 'loras'"),
    ("fix-hand", "Invalid value for 'loras'"),
    ([{"name": "fix-hand", "scale": "1"}], "Invalid value for 'loras.0.scale'"),
])
def test_bad_adapter_choices_are_a_400_naming_the_field(server, loras, expected):
    message = error_of(generate(server, loras=loras))
    assert message.startswith(expected) or expected in message, message


def test_a_refused_file_is_named_with_its_key(server):
    message = error_of(generate(server, loras=[{"name": "broken"}]))
    assert "broken.safetensors" in message and "lora_te1_text_model_encoder_layers_0_mlp_fc1" in message
    assert "text-encoder" in message


def test_multipart_takes_json_text_and_the_openai_sdk_form(server):
    import openai

    loras = [{"name": "fix-hand", "scale": 0.8}, {"name": "sketch", "scale": -0.5}]
    want = image_of(generate(server, loras=loras))
    form = {"prompt": "add a hat", "steps": "1", "seed": "5", "response_format": "b64_json"}
    files = {"image": ("i.png", png_bytes(), "image/png")}
    as_json = httpx.post(server.api + "/images/edits", data={**form, "loras": json.dumps(loras)}, files=files,
                         headers=AUTH, timeout=120)
    assert image_of(as_json) == want
    client = openai.OpenAI(base_url=server.api, api_key=KEY, max_retries=0)
    edit = client.images.edit(image=("i.png", png_bytes(), "image/png"), prompt="add a hat", model=MODEL,
                              response_format="b64_json", extra_body={"seed": 5, "steps": 1, "loras": loras})
    assert base64.b64decode(edit.data[0].b64_json) == want  # sent as loras[][name], loras[][scale] fields
    gen = client.images.generate(model=MODEL, prompt="add a hat", response_format="b64_json",
                                 extra_body={"image": data_uri(), "seed": 5, "steps": 1, "loras": loras})
    assert base64.b64decode(gen.data[0].b64_json) == want


@pytest.mark.parametrize("fields, expected", [
    ({"loras": "[{\"name\": \"fix-hand\""}, "Invalid value for 'loras': expected JSON text"),
    ({"loras": json.dumps([{"name": "fix-hand"}]), "loras[][name]": "sketch"}, "sent both as JSON text"),
    ({"loras[][name]": "fix-hand", "loras[][scale]": "x"}, "Invalid value for 'scale'"),
    ({"loras[][name]": "nope"}, "loras: unknown adapter 'nope'"),
    ([("loras[][name]", "fix-hand"), ("loras[][name]", "sketch"), ("loras[][scale]", "0.5")],
     "got 2 'loras[][name]', 1 'loras[][scale]'"),
])
def test_bad_adapter_fields_in_a_form_are_a_400(server, fields, expected):
    pairs = list(fields.items()) if isinstance(fields, dict) else fields
    body = [("prompt", "add a hat"), ("steps", "1"), *pairs]
    files = [(k, (None, v)) for k, v in body] + [("image", ("i.png", png_bytes(), "image/png"))]
    response = httpx.post(server.api + "/images/edits", files=files, headers=AUTH, timeout=120)
    assert expected in error_of(response)
