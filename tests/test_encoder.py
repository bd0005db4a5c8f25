"""The Qwen2.5-VL conditioner: vocabulary, prompt template, quote splitting, image processing, encode()."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_edit.models import encoder as E
from step1x_edit.models import qwen_vocab as qv

IMAGE_PAD = qv.IMAGE_PAD_ID


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return qv.qwen_tokenizer()


@pytest.fixture(scope="module")
def cond():
    return E.build_dev_conditioner(seed=0)


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rs = np.random.RandomState(seed)
    base = rs.randint(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)  # smooth-ish, like a photo
    arr = np.asarray(img).astype(np.int16) + rs.randint(-8, 9, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def img512():
    return _noise_image(512, 512)


# ----------------------------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------------------------


def test_vocab_known_ids(tok):
    assert tok("Hello world, this is Qwen!", add_special_tokens=False)["input_ids"] == [9707, 1879, 11, 419, 374, 1207, 16948, 0]
    assert tok.convert_ids_to_tokens([2073, 854]) == ["âĢľ", "âĢĿ"]
    assert tok.decode([2073]) == "“" and tok.decode([854]) == "”"
    assert len(tok) == qv.NUM_BASE_TOKENS + len(qv.SPECIAL_TOKENS) == 151665


def test_vocab_special_tokens(tok):
    expect = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
        "<tool_call>": 151657,
        "<|file_sep|>": 151664,
    }
    for t, i in expect.items():
        assert tok.convert_tokens_to_ids(t) == i
    ids = tok("a<|vision_start|><|image_pad|><|vision_end|>b", add_special_tokens=False)["input_ids"]
    assert ids == [64, 151652, 151655, 151653, 65]
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643


def test_vocab_matches_tiktoken_ranks(tok):
    """BPE with the rebuilt merges gives what tiktoken gives with the raw ranks (no special tokens in the text)."""
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("qwen", pat_str=qv.PRETOKENIZE_REGEX, mergeable_ranks=qv.load_ranks(), special_tokens={})
    rs = np.random.RandomState(0)
    alphabet = [chr(c) for c in list(range(32, 127)) + list(range(0xA0, 0x250)) + list(range(0x4E00, 0x4E60))]
    alphabet += ["“", "”", "‘", "’", "\n", "\t", "  ", "😀", "é"]
    texts = [E.PREFIX, "改变背景为蓝色，并添加文字“你好”", "Replace 'cat' with \"dog\"!!  \n\n  ok"]
    texts += ["".join(rs.choice(alphabet, rs.randint(1, 40))) for _ in range(300)]
    for s in texts:
        assert tok(s, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(s), s


def test_vocab_cache_file(tmp_path):
    p = qv.cached_tokenizer_json(cache=tmp_path)
    assert p.is_file() and p.parent.parent == tmp_path / "qwen-vocab"
    mtime = p.stat().st_mtime_ns
    assert qv.cached_tokenizer_json(cache=tmp_path) == p and p.stat().st_mtime_ns == mtime  # reused, not rebuilt
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(p))
    assert t.encode("Hello world, this is Qwen!").ids == [9707, 1879, 11, 419, 374, 1207, 16948, 0]
    doc = json.loads(p.read_text(encoding="utf-8"))
    assert len(doc["model"]["merges"]) == qv.NUM_BASE_TOKENS - 256  # one merge per multi-byte token


def test_vocab_without_writable_cache(monkeypatch):
    built = qv.cached_tokenizer_json().read_text(encoding="utf-8")
    calls = []
    monkeypatch.setattr(qv, "load_ranks", lambda path=None: {})
    monkeypatch.setattr(qv, "build_tokenizer_json", lambda ranks: calls.append(1) or built)
    t = qv.qwen_tokenizer_object(cache="/proc/step1x-no-such-dir")  # cannot be created: built in memory
    assert calls == [1] and t.encode("Hello world").ids == [9707, 1879]


def test_chat_template_vision_id(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image", "image": None}, {"type": "text", "text": "B"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "APicture 1: <|vision_start|><|image_pad|><|vision_end|>B<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "Picture 1: " not in plain


# ----------------------------------------------------------------------------------------------------------------
# prompt template
# ----------------------------------------------------------------------------------------------------------------


def test_prefix_text():
    assert E.PREFIX.startswith('Given a user prompt, generate an "Enhanced prompt" that provides detailed visual')
    assert E.PREFIX.endswith("commentary or evaluations:\nUser Prompt:")
    assert E.PREFIX.count("\n\n") == 2 and "'" not in E.PREFIX
    assert hashlib.sha256(E.PREFIX.encode()).hexdigest() == "40882ddca94ca6971c8d5713d42464afa31dad09236dfacafe3ee26b4b44aa82"


def test_template_positions(cond):
    proc = cond.processor
    text = proc.template("make the sky purple")
    assert text.index('"') == 108  # first quote of the prefix: below 155, never splits
    assert text.index(E.PREFIX) == 75
    assert text.endswith("User Prompt:Picture 1: <|vision_start|><|image_pad|><|vision_end|>make the sky purple<|im_end|>\n<|im_start|>assistant\n")
    ids = proc.encode_text([text])[0]
    toks = proc.tokenizer.convert_ids_to_tokens(ids)
    assert toks[E.DROP_TOKENS] == ":" and toks[E.DROP_TOKENS - 1] == "ĠPrompt" and toks[E.DROP_TOKENS - 2] == "User"
    assert toks[E.DROP_TOKENS + 1] == "Picture"
    assert proc.tokenizer.decode(ids[: E.DROP_TOKENS + 1]).endswith("User Prompt:")
    assert ids.count(IMAGE_PAD) == 1


# ----------------------------------------------------------------------------------------------------------------
# quote splitting
# ----------------------------------------------------------------------------------------------------------------


PAD = "x" * 160  # pushes what follows past character 155


def test_split_quoted_before_155_is_plain():
    assert E.split_quoted('say "hi" now') == ['say "hi" now']
    s = "y" * 150 + '"ab"'  # opening quote at 150 (plain), closing at 153 (plain)
    assert E.split_quoted(s) == [s]


def test_split_quoted_after_155():
    assert E.split_quoted(PAD + 'say "ab" ok') == [PAD + 'say "', "“a”", "“b”", '" ok']
    # the boundary: a quote at index 155 is plain, at 156 it toggles
    s155 = "z" * 155 + '"q"'  # the closing quote (157) opens a quoted run that is empty
    assert E.split_quoted(s155) == [s155]
    assert E.split_quoted("z" * 156 + '"q"') == ["z" * 156 + '"', "“q”", '"']
    assert E.split_quoted("z" * 154 + '"q"') == ["z" * 154 + '"q"']


def test_split_quoted_curly_apostrophe_and_spaces():
    assert E.split_quoted(PAD + "“a b”") == E.split_quoted(PAD + '"a b"') == [PAD + '"', "“a”", "“ ”", "“b”", '"']
    # an apostrophe is a quote too (official behaviour): it opens a quoted run
    assert E.split_quoted(PAD + "don't stop") == [PAD + 'don"', "“t”", "“ ”", "“s”", "“t”", "“o”", "“p”"]
    assert E.split_quoted(PAD + '"') == [PAD + '"']  # unclosed quote at the very end
    assert "".join(c if not c.startswith("“") else c[1] for c in E.split_quoted(PAD + 'a "bc" d')) == PAD + 'a "bc" d'


def test_spliced_ids_without_quotes_equal_plain_ids(cond):
    proc = cond.processor
    for instr in ["make the sky purple", "", "换成蓝色背景", "add a hat!"]:
        text = proc.template(instr)
        plain = proc.encode_text([text.replace("<|image_pad|>", "<|image_pad|>" * 7)])[0]
        assert proc.spliced_ids(text, 7) == plain


def test_spliced_ids_quotes_tokenise_per_character(cond):
    proc = cond.processor
    text = proc.template('write "HELLO" on the sign')
    ids = proc.spliced_ids(text, 4)
    plain = proc.encode_text([text.replace("<|image_pad|>", "<|image_pad|>" * 4)])[0]
    assert ids != plain
    start = ids.index(qv.VISION_END_ID)
    assert ids[: start + 1] == plain[: plain.index(qv.VISION_END_ID) + 1]
    toks = proc.tokenizer.convert_ids_to_tokens(ids[start + 1 :])
    q = toks.index('Ġ"')  # ` "` stays in the plain chunk before the letters
    assert toks[q + 1 : q + 6] == ["H", "E", "L", "L", "O"]
    assert proc.tokenizer.decode(ids[start + 1 :]) == 'write "HELLO" on the sign<|im_end|>\n<|im_start|>assistant\n'
    # a space inside quotes keeps the official quirk: "“ ”" -> [“, ” with space] (the pair is not stripped)
    ids2 = proc.spliced_ids(proc.template('"a b"'), 1)
    assert 18987 in ids2 and 2073 in ids2
    # curly quotes behave like straight ones
    assert proc.spliced_ids(proc.template("write “HELLO” on the sign"), 4) == ids


def test_reserved_tokens_in_prompt_rejected(cond, img512):
    with pytest.raises(ValueError, match="image_pad"):
        cond.encode(["draw <|image_pad|> here"], [img512])


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------

_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _reference_pixels(img: Image.Image):
    """qwen_vl_utils 0.0.10 fetch_image + transformers 4.49's slow Qwen2VLImageProcessor, in plain numpy/PIL."""

    def size_rule(h, w, mn, mx, at_least_factor):
        f = 28
        hb, wb = round(h / f) * f, round(w / f) * f
        if at_least_factor:
            hb, wb = max(f, hb), max(f, wb)
        if hb * wb > mx:
            beta = math.sqrt(h * w / mx)
            hb, wb = math.floor(h / beta / f) * f, math.floor(w / beta / f) * f
        elif hb * wb < mn:
            beta = math.sqrt(mn / (h * w))
            hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
        return hb, wb

    img = img.convert("RGB")
    w, h = img.size
    h1, w1 = size_rule(h, w, 4 * 28 * 28, 16384 * 28 * 28, True)
    img = img.resize((w1, h1))  # Pillow's default filter, as qwen_vl_utils calls it
    h2, w2 = size_rule(h1, w1, 256 * 28 * 28, 324 * 28 * 28, False)
    img = img.resize((w2, h2), Image.Resampling.BICUBIC)
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = ((x - _MEAN) / _STD).transpose(2, 0, 1)
    gh, gw = h2 // 14, w2 // 14
    p = np.tile(x[None], (2, 1, 1, 1))  # a still image is repeated to the temporal patch size
    p = p.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(gh * gw, 3 * 2 * 14 * 14), (1, gh, gw)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((512, 512), (1, 36, 36)), ((1168, 880), (1, 30, 40)), ((880, 1168), (1, 40, 30)), ((333, 777), (1, 54, 22)), ((64, 48), (1, 32, 32))],
)
def test_image_inputs_match_official_processing(cond, size, grid):
    img = _noise_image(*size, seed=size[0])
    pv, g = cond.processor.image_inputs(img)
    ref, ref_grid = _reference_pixels(img)
    assert g == ref_grid == grid
    assert pv.dtype == np.float32 and pv.shape == (grid[1] * grid[2], 1176)
    assert np.array_equal(pv, ref)


def test_image_processor_is_pil_backend(cond):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = cond.processor.image_processor
    assert isinstance(ip, Qwen2VLImageProcessorPil)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (200704, 254016)


def test_vision_utils_resize_sizes():
    assert E.vision_utils_resize(Image.new("RGB", (1024, 1024))).size == (1036, 1036)
    assert E.vision_utils_resize(Image.new("RGB", (1168, 880))).size == (1176, 868)
    assert E.vision_utils_resize(Image.new("L", (10, 10))).mode == "RGB"
    with pytest.raises(ValueError, match="aspect ratio"):
        E.vision_utils_resize(Image.new("RGB", (4000, 16)))


# ----------------------------------------------------------------------------------------------------------------
# encode
# ----------------------------------------------------------------------------------------------------------------


def test_encode_shapes_mask_usage(cond, img512):
    out = cond.encode(["make the sky purple"], [img512])
    assert out.embeddings.shape == (1, 640, cond.hidden_size) == (1, 640, 64)
    assert out.embeddings.dtype == torch.float32 and out.mask.dtype == torch.int64
    p = cond.processor.prepare("make the sky purple", img512)
    n = min(640, len(p.ids) - 217)
    assert out.mask.sum().item() == n and bool(out.mask[0, :n].all())
    assert torch.count_nonzero(out.embeddings[0, n:]) == 0
    assert bool((out.embeddings[0, :n].abs().sum(-1) > 0).all())
    assert out.image_tokens == [324] and out.text_tokens == [len(p.ids) - 324]
    assert p.ids.count(IMAGE_PAD) == 324


def test_encode_matches_official_style_forward(cond, img512):
    """encode() == the official call: full model, output_hidden_states, hidden_states[-1][217:][:640]."""
    prompt = 'put "OPEN" on the door!'
    p = cond.processor.prepare(prompt, img512)
    ids = torch.tensor([p.ids])
    attn = (ids > 0).long()
    assert attn.min() == 0  # the lone "!" (id 0) is masked exactly as the official code masks it
    mm = (ids == IMAGE_PAD).int()
    grid = torch.tensor([p.grid_thw])
    with torch.inference_mode():
        ref_pos, _ = cond.model.model.get_rope_index(ids, mm, image_grid_thw=grid, attention_mask=attn)
        pos = E.rope_positions(p.ids, attn[0].tolist(), p.grid_thw, 2, IMAGE_PAD)
        valid = attn[0].bool()
        assert torch.equal(pos[:, valid], ref_pos[:, 0, valid])  # 4.49 and 5.x agree on attended tokens
        full = cond.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos[:, None],
            pixel_values=torch.from_numpy(p.pixel_values),
            image_grid_thw=grid,
            output_hidden_states=True,
        ).hidden_states[-1]
    out = cond.encode([prompt], [img512])
    n = min(640, ids.shape[1] - 217)
    torch.testing.assert_close(out.embeddings[0, :n], full[0, 217 : 217 + n], rtol=0, atol=0)


def test_encode_truncates_to_640(cond, img512):
    prompt = " ".join(f"word{i}" for i in range(500))
    p = cond.processor.prepare(prompt, img512)
    assert len(p.ids) - 217 > 640
    out = cond.encode([prompt], [img512])
    assert out.mask.sum().item() == 640 and bool(out.mask.all())
    assert bool((out.embeddings[0].abs().sum(-1) > 0).all())
    # feeding only the first 217+640 tokens changes nothing (causal attention)
    ids = torch.tensor([p.ids])
    with torch.inference_mode():
        full = cond.model.model(
            input_ids=ids,
            attention_mask=(ids > 0).long(),
            position_ids=E.rope_positions(p.ids, [1] * len(p.ids), p.grid_thw, 2, IMAGE_PAD)[:, None],
            pixel_values=torch.from_numpy(p.pixel_values),
            image_grid_thw=torch.tensor([p.grid_thw]),
            use_cache=False,
        ).last_hidden_state
    torch.testing.assert_close(out.embeddings[0], full[0, 217:857], rtol=1e-5, atol=1e-6)
    assert out.text_tokens == [len(p.ids) - 324]


def test_encode_batch_equals_single(cond, img512):
    prompts = ["a", 'replace the text with "SALE 50%" in red letters, keep the background']
    imgs = [img512, _noise_image(700, 400, seed=3)]
    out = cond.encode(prompts, imgs)
    counts = out.mask.sum(1).tolist()
    assert counts[0] < counts[1]
    for i in range(2):
        one = cond.encode([prompts[i]], [imgs[i]])
        assert one.mask.sum().item() == counts[i]
        torch.testing.assert_close(out.embeddings[i], one.embeddings[0], rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(out.embeddings[i, counts[i] :]) == 0
    _, (t, h, w) = cond.processor.image_inputs(imgs[1])
    assert out.image_tokens == [324, t * h * w // 4]


def test_encode_empty_and_negative_prompt(cond, img512):
    out = cond.encode(["make it blue", ""], [img512, img512])
    assert out.embeddings.shape[0] == 2
    assert out.mask[1].sum() < out.mask[0].sum()
    assert out.image_tokens == [324, 324]
    assert cond.encode([], []).embeddings.shape == (0, 640, 64)
    with pytest.raises(ValueError, match="one image per prompt"):
        cond.encode(["a", "b"], [img512])


def test_dev_conditioner_deterministic(cond, img512):
    state = torch.random.get_rng_state()
    again = E.build_dev_conditioner(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    other = E.build_dev_conditioner(seed=1)
    a = cond.encode(["make it blue"], [img512]).embeddings
    assert torch.equal(again.encode(["make it blue"], [img512]).embeddings, a)
    assert not torch.equal(other.encode(["make it blue"], [img512]).embeddings, a)
    for (n1, p1), (n2, p2) in zip(cond.model.state_dict().items(), again.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_dev_conditioner_bf16_and_hidden_size(img512):
    c = E.build_dev_conditioner(seed=0, dtype=torch.bfloat16, hidden_size=32)
    out = c.encode(["x"], [img512])
    assert c.hidden_size == 32 and out.embeddings.dtype == torch.bfloat16 and out.embeddings.shape == (1, 640, 32)
    assert c.model.config.text_config.rope_parameters["mrope_section"] == [2, 1, 1]
    assert E._mrope_section(128) == [16, 24, 24]


# ----------------------------------------------------------------------------------------------------------------
# loading a model directory
# ----------------------------------------------------------------------------------------------------------------


def _save_like_hf(cond, folder, with_tokenizer=True):
    folder.mkdir(parents=True, exist_ok=True)
    cond.model.save_pretrained(folder)
    if with_tokenizer:
        shutil.copy(qv.cached_tokenizer_json(), folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": qv.CHAT_TEMPLATE}))
        (folder / "preprocessor_config.json").write_text(
            json.dumps({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2})
        )


def test_load_conditioner_roundtrip(cond, img512, tmp_path):
    _save_like_hf(cond, tmp_path / "qwen")
    loaded = E.load_conditioner(tmp_path / "qwen", device="cpu", dtype=torch.float32)
    assert isinstance(loaded.model.lm_head, torch.nn.Identity)
    a = cond.encode(["make it blue"], [img512])
    b = loaded.encode(["make it blue"], [img512])
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.mask, b.mask)
    # diffusers-style folder: text_encoder/ (weights) + processor/ (tokenizer etc.)
    root = tmp_path / "pipe"
    for sub in ("text_encoder", "processor"):
        (root / sub).mkdir(parents=True)
    for f in (tmp_path / "qwen").iterdir():
        sub = "text_encoder" if f.name.startswith(("model", "config", "generation")) else "processor"
        shutil.copy(f, root / sub / f.name)
    loaded2 = E.load_conditioner(root, device="cpu", dtype=torch.float32)
    assert torch.equal(loaded2.encode(["make it blue"], [img512]).embeddings, a.embeddings)


def test_load_conditioner_errors(cond, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        E.load_conditioner(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        E.load_conditioner(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        E.load_conditioner(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        E.load_conditioner(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors"):
        E.load_conditioner(tmp_path)
    good = tmp_path / "good"
    _save_like_hf(cond, good, with_tokenizer=False)
    with pytest.raises(ValueError, match="tokenizer.json"):
        E.load_conditioner(good)
