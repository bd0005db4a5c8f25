"""The Step1X-Edit conditioner: Qwen2.5-VL-7B-Instruct hidden states for (instruction, reference image).

Reproduces the official `Qwen25VL_7b_Embedder` (stepfun-ai/Step1X-Edit, `modules/conditioner.py`, run with
transformers 4.49 and qwen-vl-utils 0.0.10), per sample:

1. one user message [PREFIX text, the image, the instruction] rendered with the Qwen2-VL chat template
   (`add_generation_prompt=True, add_vision_id=True`, so the default system turn and `Picture 1: ` are present);
2. the image as `qwen_vl_utils.process_vision_info` leaves it (RGB; resized with Pillow's default filter, bicubic,
   to `smart_resize(h, w, 28, 4*28*28, 16384*28*28)`), then the slow (PIL/numpy) Qwen2-VL image processor with
   `min_pixels=256*28*28, max_pixels=324*28*28` (a second bicubic resize, /255, CLIP mean/std, 14px patches);
3. ids = the normal ids up to the first `<|vision_end|>` + the ids of `split_quoted(text)` (every character
   inside double quotes after character 155 tokenised alone) from that token on; `attention_mask = ids > 0`
   (so a lone `!`, id 0, is masked out exactly as in the official code);
4. last hidden layer, positions 217.. (position 217 is the `:` that ends `User Prompt:`), at most 640 of them,
   written into zeros [B, 640, H]; mask [B, 640] int64.

Differences that do not change the kept numbers: samples of a batch run in one forward pass (right padding;
causal attention, so valid positions never see the padding), the vocabulary projection (`lm_head`) is not
computed, and tokens after position 217 + 640 are not fed to the model (causal attention: they cannot change
the kept positions). The attention kernel is SDPA unless told otherwise (official v1.1 uses SDPA, v1.0
flash-attention 2; they differ only in the hidden state *of* a masked `!` token, never in what other tokens see).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import qwen_vocab

__all__ = [
    "DROP_TOKENS",
    "MAX_LENGTH",
    "PREFIX",
    "PROCESSOR_MAX_PIXELS",
    "PROCESSOR_MIN_PIXELS",
    "QUOTE_INDEX",
    "EncoderOutput",
    "Step1XConditioner",
    "Step1XProcessor",
    "build_dev_conditioner",
    "dev_config",
    "dev_processor",
    "load_conditioner",
    "load_processor",
    "rope_positions",
    "smart_resize",
    "split_quoted",
    "vision_utils_resize",
]

logger = logging.getLogger(__name__)

# The official "Enhanced prompt" instruction (`Qwen25VL_7b_PREFIX` in modules/conditioner.py), verbatim.
PREFIX = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:\n"
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.\n"
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.\n\n"
    "Here are examples of how to transform or refine prompts:\n"
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n"
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.\n\n"
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:\n"
    "User Prompt:"
)

MAX_LENGTH = 640  # kept encoder positions (official `max_length`)
DROP_TOKENS = 217  # leading positions dropped (system turn + user header + PREFIX up to `User Prompt`)
QUOTE_INDEX = 155  # a `"` toggles per-character tokenisation only at character indices above this

# The official processor bounds (`AutoProcessor.from_pretrained(..., min_pixels=..., max_pixels=...)`).
PROCESSOR_MIN_PIXELS = 256 * 28 * 28
PROCESSOR_MAX_PIXELS = 324 * 28 * 28
# qwen_vl_utils.fetch_image defaults (IMAGE_FACTOR, MIN_PIXELS, MAX_PIXELS, MAX_RATIO).
VISION_UTILS_FACTOR = 28
VISION_UTILS_MIN_PIXELS = 4 * 28 * 28
VISION_UTILS_MAX_PIXELS = 16384 * 28 * 28
MAX_ASPECT_RATIO = 200

OPEN_QUOTE_ID = 2073  # "“"
CLOSE_QUOTE_ID = 854  # "”"

# Tokens that would break the image placeholder alignment if a user's instruction contained them.
_RESERVED_IN_PROMPT = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


# --------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------


def split_quoted(text: str) -> list[str]:
    """The official `split_string`: chunks to tokenise one by one.

    `“`, `”` and `'` become `"`. A `"` at character index > 155 toggles "inside quotes" and stays in the running
    plain-text chunk (an opening quote closes that chunk). Inside quotes every character is its own chunk,
    wrapped as `“c”`; outside, characters accumulate.
    """
    s = text.replace("“", '"').replace("”", '"').replace("'", '"')
    chunks: list[str] = []
    plain = ""
    quoted = False
    for i, ch in enumerate(s):
        if ch == '"' and i > QUOTE_INDEX:
            plain += ch
            if not quoted:
                chunks.append(plain)
                plain = ""
            quoted = not quoted
        elif quoted:
            chunks.append(f"“{ch}”")
        else:
            plain += ch
    if plain:
        chunks.append(plain)
    return chunks


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's size rule: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    (qwen_vl_utils' version, which also never returns a side below `factor`; on the sizes the official pipeline
    produces it equals transformers' version.) Python's `round` (half to even) as in both originals.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f} ({width}x{height})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def vision_utils_resize(image: Image.Image) -> Image.Image:
    """What `qwen_vl_utils.process_vision_info` (0.0.10) does to a PIL image before the processor.

    RGB conversion, then `image.resize((w', h'))` with Pillow's default filter for RGB (bicubic) to
    `smart_resize(h, w, 28, 4*28*28, 16384*28*28)`.
    """
    image = image.convert("RGB")  # no-op copy-free for RGB input in practice; official input is always RGB
    width, height = image.size
    h, w = smart_resize(height, width, VISION_UTILS_FACTOR, VISION_UTILS_MIN_PIXELS, VISION_UTILS_MAX_PIXELS)
    return image.resize((w, h), resample=Image.Resampling.BICUBIC)


def _pil_image_processor(min_pixels: int = PROCESSOR_MIN_PIXELS, max_pixels: int = PROCESSOR_MAX_PIXELS, **kw: Any):
    """transformers' numpy/PIL Qwen2-VL image processor (never the torchvision "fast" one)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **kw)


# --------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    ids: list[int]
    pixel_values: np.ndarray  # [patches, C*T*P*P] float32
    grid_thw: tuple[int, int, int]
    image_tokens: int


class Step1XProcessor:
    """Tokenizer + chat template + image processor, used the way the official embedder uses its processor.

    (transformers 5's `Qwen2_5_VLProcessor` insists on a video processor, which needs torchvision; this holds
    the same parts and does the same steps: render the template, process the image, expand `<|image_pad|>` to
    grid_t*grid_h*grid_w/merge² copies, tokenise.)
    """

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or qwen_vocab.CHAT_TEMPLATE
        self.merge_size = int(image_processor.merge_size)
        for tok, want in (
            ("<|vision_start|>", qwen_vocab.VISION_START_ID),
            ("<|vision_end|>", qwen_vocab.VISION_END_ID),
            ("<|image_pad|>", qwen_vocab.IMAGE_PAD_ID),
        ):
            got = tokenizer.convert_tokens_to_ids(tok)
            if got != want:
                raise ValueError(f"tokenizer maps {tok} to {got}, expected {want} (not a Qwen2.5-VL tokenizer)")
        self.image_token_id = qwen_vocab.IMAGE_PAD_ID
        self.vision_end_id = qwen_vocab.VISION_END_ID

    # -- text ------------------------------------------------------------------------------------------------
    def messages(self, instruction: str, image: Any = None) -> list[dict[str, Any]]:
        return [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": PREFIX},
                    {"type": "image", "image": image},
                    {"type": "text", "text": instruction},
                ],
            }
        ]

    def template(self, instruction: str) -> str:
        """The templated prompt with one `<|image_pad|>` (as `apply_chat_template(..., add_vision_id=True)`)."""
        return self.tokenizer.apply_chat_template(
            self.messages(instruction),
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=True,
            add_vision_id=True,
        )

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain tokenisation (no special tokens added; special-token strings are parsed as such)."""
        if not texts:
            return []
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def spliced_ids(self, text: str, num_image_tokens: int) -> list[int]:
        """Official ids: expanded normal ids up to the first `<|vision_end|>`, quote-split ids from it on."""
        (plain,) = self.encode_text([text.replace("<|image_pad|>", "<|image_pad|>" * num_image_tokens, 1)])
        new: list[int] = []
        for ids in self.encode_text(split_quoted(text)):
            if ids and ids[0] == OPEN_QUOTE_ID and ids[-1] == CLOSE_QUOTE_ID:
                ids = ids[1:-1]
            new.extend(ids)
        try:
            cut_old = plain.index(self.vision_end_id)
            cut_new = new.index(self.vision_end_id)
        except ValueError as e:  # pragma: no cover - the template always has one
            raise RuntimeError("templated prompt has no <|vision_end|> token") from e
        return plain[:cut_old] + new[cut_new:]

    # -- images ----------------------------------------------------------------------------------------------
    def image_inputs(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(pixel_values [patches, 1176] float32, (t, h, w) patch grid) as the official processor produces."""
        image = vision_utils_resize(image)
        out = self.image_processor(images=[image], return_tensors="np")
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
        t, h, w = (int(x) for x in np.asarray(out["image_grid_thw"]).reshape(-1, 3)[0])
        return pixel_values, (t, h, w)

    # -- both ------------------------------------------------------------------------------------------------
    def prepare(self, instruction: str, image: Image.Image, image_cache: dict[int, Any] | None = None) -> _Prepared:
        for tok in _RESERVED_IN_PROMPT:
            if tok in instruction:
                raise ValueError(f"prompt must not contain the reserved token {tok!r}")
        key = id(image)
        if image_cache is not None and key in image_cache:
            pixel_values, grid = image_cache[key]
        else:
            pixel_values, grid = self.image_inputs(image)
            if image_cache is not None:
                image_cache[key] = (pixel_values, grid)
        n_img = grid[0] * grid[1] * grid[2] // (self.merge_size**2)
        ids = self.spliced_ids(self.template(instruction), n_img)
        return _Prepared(ids=ids, pixel_values=pixel_values, grid_thw=grid, image_tokens=n_img)


# --------------------------------------------------------------------------------------------------------------
# Conditioner
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    embeddings: torch.Tensor  # [B, 640, H], model dtype, zeros after each sample's valid positions
    mask: torch.Tensor  # [B, 640] int64, 1 on valid positions
    text_tokens: list[int] = field(default_factory=list)  # per sample: encoder input tokens that are not image pads
    image_tokens: list[int] = field(default_factory=list)  # per sample: image placeholder tokens (merged patches)


def rope_positions(ids: list[int], attn: list[int], grid_thw: tuple[int, int, int], merge: int, image_id: int) -> torch.Tensor:
    """M-RoPE position ids [3, L] as transformers 4.49's `Qwen2_5_VLForConditionalGeneration.get_rope_index`.

    Positions run over the tokens with attention 1 only (text: one shared index; the image block: t/h/w grid
    offsets); tokens with attention 0 get position 1, as that function left them.
    """
    n = len(ids)
    pos = torch.ones(3, n, dtype=torch.long)
    keep = [i for i in range(n) if attn[i]]
    kept_ids = [ids[i] for i in keep]
    t, h, w = grid_thw
    gh, gw = h // merge, w // merge
    out = torch.empty(3, len(kept_ids), dtype=torch.long)
    try:
        start = kept_ids.index(image_id)
    except ValueError:
        start = len(kept_ids)
    n_img = t * gh * gw if start < len(kept_ids) else 0
    out[:, :start] = torch.arange(start)
    if n_img:
        tt = torch.zeros(t * gh * gw, dtype=torch.long)  # still image: temporal offset 0
        hh = torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).reshape(-1)
        ww = torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).reshape(-1)
        out[:, start : start + n_img] = torch.stack([tt, hh, ww]) + start
        nxt = start + max(t - 1, gh - 1, gw - 1) + 1
    else:
        nxt = start
    rest = len(kept_ids) - start - n_img
    out[:, start + n_img :] = torch.arange(rest) + nxt
    pos[:, keep] = out
    return pos


class Step1XConditioner:
    """Qwen2.5-VL-7B-Instruct (or the tiny dev model) + `Step1XProcessor`; `encode()` gives DiT conditioning."""

    def __init__(self, model: Any, processor: Step1XProcessor, max_length: int = MAX_LENGTH, drop_tokens: int = DROP_TOKENS):
        self.model = model
        self.processor = processor
        self.max_length = int(max_length)
        self.drop_tokens = int(drop_tokens)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prepare(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[_Prepared]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings")
        if len(prompts) != len(images):
            raise ValueError(f"need one image per prompt, got {len(prompts)} prompts and {len(images)} images")
        cache: dict[int, Any] = {}
        return [self.processor.prepare(p, im, cache) for p, im in zip(prompts, images)]

    def encode(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> EncoderOutput:
        """Hidden states for each (instruction, reference image): [B, 640, H] plus mask and token counts."""
        prepared = self.prepare(prompts, images)
        b = len(prepared)
        device, dtype = self.device, self.dtype
        emb = torch.zeros(b, self.max_length, self.hidden_size, dtype=dtype, device=device)
        mask = torch.zeros(b, self.max_length, dtype=torch.long, device=device)
        text_tokens = [len(p.ids) - p.image_tokens for p in prepared]
        image_tokens = [p.image_tokens for p in prepared]
        if b == 0:
            return EncoderOutput(emb, mask, text_tokens, image_tokens)

        # Positions past drop+max_length never influence kept ones (causal attention): do not compute them.
        limit = self.drop_tokens + self.max_length
        seqs, attns, poss = [], [], []
        merge = self.processor.merge_size
        for p in prepared:
            attn = [1 if i > 0 else 0 for i in p.ids]  # official: attention_mask = input_ids > 0
            pos = rope_positions(p.ids, attn, p.grid_thw, merge, self.processor.image_token_id)
            last_img = max(i for i, t in enumerate(p.ids) if t == self.processor.image_token_id)
            n = max(min(len(p.ids), limit), last_img + 1)
            seqs.append(p.ids[:n])
            attns.append(attn[:n])
            poss.append(pos[:, :n])
        length = max(len(s) for s in seqs)
        pad_id = self.processor.tokenizer.pad_token_id
        pad_id = 151643 if pad_id is None else pad_id  # any id: right padding is masked and never attended
        input_ids = torch.full((b, length), int(pad_id), dtype=torch.long)
        attention = torch.zeros(b, length, dtype=torch.long)
        position_ids = torch.zeros(3, b, length, dtype=torch.long)
        for i, (s, a, ps) in enumerate(zip(seqs, attns, poss)):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention[i, : len(s)] = torch.tensor(a, dtype=torch.long)
            position_ids[:, i, : len(s)] = ps
        pixel_values = torch.from_numpy(np.concatenate([p.pixel_values for p in prepared], axis=0))
        grid = torch.tensor([p.grid_thw for p in prepared], dtype=torch.long)

        with torch.inference_mode():
            out = self.model.model(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                position_ids=position_ids.to(device),
                pixel_values=pixel_values.to(device=device, dtype=dtype),
                image_grid_thw=grid.to(device),
                use_cache=False,
            )
            hidden = out.last_hidden_state
            for i, s in enumerate(seqs):
                n = min(self.max_length, len(prepared[i].ids) - self.drop_tokens, len(s) - self.drop_tokens)
                if n <= 0:
                    continue
                emb[i, :n] = hidden[i, self.drop_tokens : self.drop_tokens + n].to(dtype)
                mask[i, :n] = 1
        return EncoderOutput(emb, mask, text_tokens, image_tokens)


# --------------------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------------------

# Qwen2.5-VL-7B's padded vocabulary size (embedding rows); the tokenizer itself has 151,665 tokens.
DEV_VOCAB_SIZE = 152064


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    hw = half * 3 // 8  # 7B: head_dim 128 -> [16, 24, 24]
    return [half - 2 * hw, hw, hw]


def qwen25_vl_config(
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vision_depth: int,
    vision_hidden: int,
    vision_intermediate: int,
    vision_heads: int,
    fullatt_blocks: list[int],
    tie_word_embeddings: bool,
):
    """A Qwen2.5-VL config with the real token ids, vocabulary size, rope, patching and merge sizes; only the
    widths and depths vary (`full_config` = the 7B's published values, `dev_config` = a tiny one)."""
    from transformers import Qwen2_5_VLConfig

    text = {
        "vocab_size": DEV_VOCAB_SIZE,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": _mrope_section(hidden_size // heads)},
        "use_cache": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": vision_intermediate,
        "num_heads": vision_heads,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": hidden_size,
        "fullatt_block_indexes": fullatt_blocks,
        "hidden_act": "silu",
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=qwen_vocab.IMAGE_PAD_ID,
        video_token_id=151656,
        vision_start_token_id=qwen_vocab.VISION_START_ID,
        vision_end_token_id=qwen_vocab.VISION_END_ID,
        tie_word_embeddings=tie_word_embeddings,
    )


def full_config():
    """Qwen2.5-VL-7B-Instruct's published config.json values (for building it with random weights: benchmarks)."""
    return qwen25_vl_config(3584, 18944, 28, 28, 4, 32, 1280, 3420, 16, [7, 15, 23, 31], tie_word_embeddings=False)


def dev_config(hidden_size: int = 64):
    """A tiny Qwen2.5-VL config with the real token ids, patching and merge sizes."""
    if hidden_size % 8 or hidden_size < 16:
        raise ValueError(f"dev hidden_size must be a multiple of 8 and >= 16, got {hidden_size}")
    return qwen25_vl_config(hidden_size, 2 * hidden_size, 2, 4, 2, 2, 32, 64, 2, [1], tie_word_embeddings=True)


def _fill_deterministic(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one CPU generator seeded with `seed`, in sorted name order."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
            if param.ndim == 1 and ("norm" in name or name.split(".")[-2].startswith("ln")):
                values += 1.0
            param.copy_(values.to(param.dtype))


def dev_processor() -> Step1XProcessor:
    return Step1XProcessor(qwen_vocab.qwen_tokenizer(), _pil_image_processor(), qwen_vocab.CHAT_TEMPLATE)


def build_dev_conditioner(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, hidden_size: int = 64
) -> Step1XConditioner:
    """Tiny random Qwen2.5-VL (2+2 layers) with the real vocabulary and processor settings. Outputs are noise."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = dev_config(hidden_size)
    with torch.random.fork_rng(devices=[]):  # HF's own init must not disturb the caller's global RNG
        torch.manual_seed(int(seed))
        # Built in the target dtype (like from_pretrained) so float32 buffers such as RoPE inv_freq stay float32.
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    _fill_deterministic(model, seed)
    model = model.to(device=device).eval().requires_grad_(False)
    return Step1XConditioner(model, dev_processor())


# -- real weights -----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from e


def _find_layout(path: Path) -> tuple[Path, Path]:
    """(model directory, processor directory) for a plain HF directory or a diffusers-style pipeline folder."""
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a Qwen2.5-VL-7B-Instruct model directory)")
    if (path / "config.json").is_file():
        return path, path
    if (path / "text_encoder" / "config.json").is_file():
        model_dir = path / "text_encoder"
        for name in ("processor", "tokenizer"):
            if (path / name / "tokenizer.json").is_file():
                return model_dir, path / name
        return model_dir, model_dir
    raise ValueError(
        f"{path}: not a Qwen2.5-VL model directory (missing config.json; "
        "expected a Qwen2.5-VL-7B-Instruct folder or a diffusers folder with text_encoder/config.json)"
    )


def _check_model_dir(model_dir: Path) -> None:
    cfg = _read_json(model_dir / "config.json")
    kind = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if kind != "qwen2_5_vl" and "Qwen2_5_VLForConditionalGeneration" not in archs:
        raise ValueError(f"{model_dir / 'config.json'}: model_type {kind!r}, expected 'qwen2_5_vl' (Qwen2.5-VL)")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index}: empty weight_map")
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise ValueError(f"{model_dir}: missing weight file {shard} (listed in model.safetensors.index.json)")
    elif not (model_dir / "model.safetensors").is_file():
        raise ValueError(f"{model_dir}: missing weight file model.safetensors (or model.safetensors.index.json)")


def _chat_template_from(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            tmpl = _read_json(folder / name).get("chat_template")
            if isinstance(tmpl, str):
                return tmpl
    return None


def load_processor(folder: str | Path) -> Step1XProcessor:
    """Tokenizer (the folder's tokenizer.json, as is), chat template and a PIL image processor with Step1X bounds."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"{folder}: missing tokenizer file tokenizer.json")
    tok_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_file),
        eos_token=tok_cfg.get("eos_token", "<|im_end|>"),
        pad_token=tok_cfg.get("pad_token", "<|endoftext|>"),
        clean_up_tokenization_spaces=False,
        model_max_length=tok_cfg.get("model_max_length", 131072),
    )
    ip_kwargs: dict[str, Any] = {}
    if (folder / "preprocessor_config.json").is_file():
        pre = _read_json(folder / "preprocessor_config.json")
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            if key in pre:
                ip_kwargs[key] = pre[key]
    template = _chat_template_from(folder)
    if template is not None and template != qwen_vocab.CHAT_TEMPLATE:
        logger.info("using the chat template of %s (differs textually from the built-in Qwen2-VL one)", folder)
    proc = Step1XProcessor(tokenizer, _pil_image_processor(**ip_kwargs), template)
    probe = proc.template("x")
    expected = Step1XProcessor(tokenizer, proc.image_processor, qwen_vocab.CHAT_TEMPLATE).template("x")
    if probe != expected:
        logger.warning("chat template of %s renders differently from Qwen2-VL's; the 217-token cut may be off", folder)
    return proc


def load_conditioner(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str | None = "sdpa",
    drop_lm_head: bool = True,
) -> Step1XConditioner:
    """Load a local Qwen2.5-VL-7B-Instruct directory (or a diffusers folder's text_encoder/ + processor/).

    Never downloads. `drop_lm_head` frees the unused vocabulary projection (~1 GB in bf16) after loading.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    model_dir, proc_dir = _find_layout(Path(path))
    _check_model_dir(model_dir)
    processor = load_processor(proc_dir)
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": str(torch.device(device))}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), **kwargs)
    if drop_lm_head:
        model.lm_head = torch.nn.Identity()
    model = model.to(device).eval().requires_grad_(False)
    return Step1XConditioner(model, processor)
