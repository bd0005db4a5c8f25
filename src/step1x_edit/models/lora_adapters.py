"""The LoRA adapters of a directory on the DiT, switched per batch with diffusers' PEFT integration.

`LoraLibrary` lists `<name>.safetensors` files of a directory, each checked against the DiT from its header at
start-up (`lora_format.inspect_lora`); a file that does not fit is left out with its reason. `LoraAdapters` puts the
chosen ones on the DiT for one batch (`applied`) and takes them off afterwards, so nothing of one request's adapters
reaches the next batch:

- eager (the default): each adapter is a PEFT adapter of its own (`load_lora_adapter` on first use, at most
  `cache_size` kept, least recently used deleted first: `delete_adapters`); a batch is `set_adapters(names, scales)`
  + `enable_lora`, then `disable_lora` (the layers run their base weights alone: the base output exactly).
- hot-swap (with regional compile): adapters would change the compiled blocks' structure, so `prepare_hotswap`
  (before compiling) gives the DiT as many zero adapter "slots" as a request may name, covering every layer any
  file adapts, at the largest rank, with tensor scales (PEFT's `prepare_model_for_compiled_hotswap`); a batch copies
  its adapters into the first slots (`load_lora_adapter(..., hotswap=True)`, skipped when a slot already holds that
  adapter and scale) and activates those slots. Shapes and scale types never change, so a switch never recompiles;
  each number of active slots, and "none", is one compiled variant, made the first time it is met.

Requests name adapters only by file stem; nothing a client sends is used as a path.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .dit import DiTConfig
from .layouts import WeightsError
from .lora_format import (LoraFile, convert, inspect_lora, lora_config, meta_tensors, peft_state_dict,
                          read_tensors)

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
# PEFT warns on every adapter after the first that a model with several adapters is unusual; here it is the design.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)

Choice = tuple[str, float]  # (adapter name, scale)


class LoraLibrary:
    """The adapter files of one directory (not its subdirectories), checked from their headers."""

    def __init__(self, directory: str | Path, cfg: DiTConfig):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"lora_dir: {self.directory} is not a directory")
        self.files: dict[str, LoraFile] = {}
        self.refused: dict[str, str] = {}  # name -> why
        for path in sorted(self.directory.iterdir()):
            if path.suffix != LORA_SUFFIX or not path.is_file():  # (a link to a file is the operator's choice)
                continue
            try:
                self.files[path.stem] = inspect_lora(path, cfg, path.stem)
            except WeightsError as e:
                self.refused[path.stem] = str(e)
                log.error("LoRA %r refused: %s", path.stem, e)
        log.info("LoRA adapters in %s: %s", self.directory, ", ".join(
            f"{f.name} (rank {f.rank}, {len(f.targets)} layers)" for f in self.files.values()) or "none")

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def refuse(self, name: str, why: str) -> None:
        """Take a file out (read by other threads: the dicts are replaced, never changed in place)."""
        self.refused = {**self.refused, name: why}
        self.files = {k: v for k, v in self.files.items() if k != name}
        log.error("LoRA %r refused: %s", name, why)

    def check(self, names: Sequence[str]) -> None:
        """ValueError naming the field for a name that is not an adapter here."""
        for name in names:
            if name in self.files:
                continue
            if name in self.refused:
                raise ValueError(f"loras: adapter {name!r} cannot be used: {self.refused[name]}")
            shown = ", ".join(self.names[:20]) + (" ..." if len(self.names) > 20 else "")
            raise ValueError(f"loras: unknown adapter {name[:100]!r}; available: {shown or 'none'}")


class LoraAdapters:
    """Adapters of a `LoraLibrary` on one DiT, per batch (see the module docstring). Used by the worker thread only."""

    def __init__(self, dit: nn.Module, library: LoraLibrary, cache_size: int = 8, slots: int = 4):
        self.dit, self.library = dit, library
        self.slots = slots  # adapters per batch at most (the request bound): hot-swap prepares this many
        self.cache_size = max(1, int(cache_size))
        self.hotswap = False
        self._loaded: OrderedDict[str, str] = OrderedDict()  # eager: name -> PEFT adapter name, oldest first
        self._counter = 0
        self._any = False  # any adapter layer on the model (so there is something to disable)
        self._active: tuple | None = None  # what was last made active (set_adapters / set_adapter), still in force
        # hot-swap: name -> state dict ready to copy into a slot; what each slot holds
        self._cached: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._slots: list[Choice | None] = []
        self._slot_layers: set[str] = set()
        self._slot_rank = 0
        self.loads = 0  # files converted and put on the model (or cached for slots)
        self.evictions = 0
        self.swaps = 0  # hot-swap copies into slots

    # --- eager ---------------------------------------------------------------------------------------------
    def _convert(self, name: str, rank: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
        lora = self.library.files[name]
        dtype = getattr(self.dit, "compute_dtype", None)
        try:
            pairs = convert(lora, read_tensors(lora))
            sd, r = peft_state_dict(pairs, self.dit, dtype=dtype, rank=rank, path=lora.path)
        except WeightsError as e:  # corrupt tensors: no later request should try it again
            self.library.refuse(name, str(e))
            raise
        device = next(self.dit.parameters()).device
        self.loads += 1
        return {k: v.to(device) for k, v in sd.items()}, r

    def _evict_until(self, room: int, keep: set[str]) -> None:
        cache = self._cached if self.hotswap else self._loaded
        for name in [n for n in cache if n not in keep]:
            if len(cache) + room <= self.cache_size:
                break
            adapter = cache.pop(name)
            if not self.hotswap:
                self._active = None
                self.dit.delete_adapters([adapter])
            self.evictions += 1
            log.info("LoRA %r dropped from the cache", name)

    def _ensure_loaded(self, name: str, keep: set[str]) -> str:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        self._evict_until(1, keep)
        t0 = time.perf_counter()
        adapter = f"lora{self._counter}"  # PEFT names are module keys: no dots, so not the file stem
        self._counter += 1
        self._active = None  # (PEFT activates a new adapter)
        # plain tensors even when called in inference mode (the pipeline's run): PEFT later toggles requires_grad
        # on them, which inference tensors refuse outside inference mode
        with torch.inference_mode(False):
            sd, rank = self._convert(name)
            layers = {k.rsplit(".lora_", 1)[0] for k in sd}
            self.dit.load_lora_adapter(sd, prefix=None, adapter_name=adapter, metadata=lora_config(rank, layers),
                                       low_cpu_mem_usage=True)
        self._any = True
        self._loaded[name] = adapter
        log.info("LoRA %r loaded (rank %d, %d layers) in %.2f s", name, rank, len(layers), time.perf_counter() - t0)
        return adapter

    # --- hot-swap ------------------------------------------------------------------------------------------
    def prepare_hotswap(self) -> None:
        """Before compiling: `slots` zero adapters over every layer any library file adapts (in every block of
        that kind, so the repeated blocks stay alike and share their compiled code), at the largest rank, with
        tensor scales. Files are planned from their headers (no tensor read)."""
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        layers: set[str] = set()
        rank = 0
        for lora in self.library.files.values():
            sd, r = peft_state_dict(convert(lora, meta_tensors(lora)), self.dit, path=lora.path)
            layers |= {k.rsplit(".lora_", 1)[0] for k in sd}
            rank = max(rank, r)
        if not layers:
            return
        layers = self._every_block(layers)
        dtype = getattr(self.dit, "compute_dtype", None) or torch.float32
        device = next(self.dit.parameters()).device
        zeros: dict[str, torch.Tensor] = {}
        for name in sorted(layers):
            layer = self.dit.get_submodule(name)
            zeros[name + ".lora_A.weight"] = torch.zeros(rank, layer.in_features, dtype=dtype, device=device)
            zeros[name + ".lora_B.weight"] = torch.zeros(layer.out_features, rank, dtype=dtype, device=device)
        with torch.inference_mode(False):  # (as in _ensure_loaded)
            for i in range(self.slots):
                self.dit.load_lora_adapter(zeros, prefix=None, adapter_name=f"slot{i}",
                                           metadata=lora_config(rank, layers), low_cpu_mem_usage=False)
        prepare_model_for_compiled_hotswap(self.dit, target_rank=rank, check_compiled="error")
        self.dit.disable_lora()
        self.hotswap, self._any = True, True
        self._slots = [None] * self.slots
        self._slot_layers, self._slot_rank = layers, rank
        log.info("LoRA hot-swap: %d slots, rank %d, %d layers", self.slots, rank, len(layers))

    def _every_block(self, layers: set[str]) -> set[str]:
        """A layer adapted in one block of a kind -> that layer in every block of that kind."""
        out = set(layers)
        for blocks in ("transformer_blocks", "single_transformer_blocks"):
            count = len(getattr(self.dit, blocks, ()))
            for name in layers:
                head, _, rest = name.partition(".")
                if head == blocks:
                    tail = rest.partition(".")[2]
                    out.update(f"{blocks}.{i}.{tail}" for i in range(count))
        return out

    def _slot_state_dict(self, name: str, keep: set[str]) -> dict[str, torch.Tensor]:
        if name in self._cached:
            self._cached.move_to_end(name)
            return self._cached[name]
        self._evict_until(1, keep)
        sd, _ = self._convert(name, rank=self._slot_rank)
        unknown = {k.rsplit(".lora_", 1)[0] for k in sd} - self._slot_layers
        if unknown:  # (cannot happen for files of the library the slots were planned from)
            raise WeightsError(f"{self.library.files[name].path}: layers {sorted(unknown)[:4]} have no hot-swap slot")
        self._cached[name] = sd
        return sd

    def _swap_in(self, choices: Sequence[Choice]) -> list[str]:
        keep = {n for n, _ in choices}
        slots = []
        for i, (name, scale) in enumerate(choices):
            slot = f"slot{i}"
            if self._slots[i] != (name, scale):
                sd = self._slot_state_dict(name, keep)
                self._slots[i] = None  # (a failed swap leaves the slot unknown)
                # scale = lora_alpha / r: PEFT writes it into the slot's scale tensors (no recompile)
                self.dit.load_lora_adapter(sd, prefix=None, adapter_name=slot, hotswap=True,
                                           metadata=lora_config(1, self._slot_layers, alpha=scale))
                self._slots[i] = (name, scale)
                self.swaps += 1
            slots.append(slot)
        return slots

    # --- per batch -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, choices: Sequence[Choice]) -> Iterator[None]:
        """The adapters `choices` ((name, scale), names from the library) on the DiT inside the block; none outside."""
        if not choices:
            if self._any:
                self.dit.disable_lora()
            yield
            return
        if len(choices) > self.slots:
            raise ValueError(f"loras: at most {self.slots} adapters per request")
        self.library.check([n for n, _ in choices])
        try:
            if self.hotswap:
                slots = tuple(self._swap_in(choices))
                if slots != self._active:  # (a swap copies weights into the slots; which are active is unchanged)
                    self._active = None
                    self.dit.set_adapter(list(slots))
                    self._active = slots
            else:
                keep = {n for n, _ in choices}
                names = [self._ensure_loaded(n, keep) for n, _ in choices]
                state = (tuple(names), tuple(float(s) for _, s in choices))
                if state != self._active:  # (the same set as the last batch: set already, only switched off)
                    self._active = None
                    self.dit.set_adapters(list(state[0]), list(state[1]))
                    self._active = state
            self.dit.enable_lora()
            yield
        finally:
            if self._any:
                self.dit.disable_lora()

    def describe(self) -> list[dict]:
        return [f.describe() for f in self.library.files.values()]

    def stats(self) -> dict[str, int]:
        return {"lora_loads": self.loads, "lora_evictions": self.evictions, "lora_swaps": self.swaps}


def build_adapters(dit: nn.Module, cfg: DiTConfig, directory: str | Path, cache_size: int,
                   slots: int) -> LoraAdapters:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ValueError("lora_dir needs the `peft` package: pip install 'step1x-edit-server[lora]'") from e
    return LoraAdapters(dit, LoraLibrary(directory, cfg), cache_size, slots)


__all__ = ["LoraAdapters", "LoraLibrary", "build_adapters"]
