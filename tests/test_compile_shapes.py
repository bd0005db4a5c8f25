"""Regional compile and the shapes a server sees: how many graphs torch.compile makes, counted by dynamo itself.

Each compiled graph reaches the backend once, so a backend that records what it is handed counts compilations
exactly (dynamo's guards and recompiles are the same whatever backend runs the graph; inductor, the real one, is
exercised by the slow test). The default checks use that recording backend and cost a few seconds.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_edit.models import fastpath, presets
from step1x_edit.pipeline import sampling
from step1x_edit.pipeline.edit import build_pipeline, warmup_shapes
from step1x_edit.pipeline.types import EditRequest
from step1x_edit.settings import Settings


class Recorder:
    """A torch.compile backend that runs the graph as captured and records which function each graph came from."""

    def __init__(self) -> None:
        self.graphs: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append("single" if "proj_mlp" in gm.code else "double")  # only single blocks have proj_mlp
        return gm.forward


def _inputs(h=16, w=16, txt=24, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 2 * (h // 2) * (w // 2), 64, generator=g)
    ids = torch.cat([sampling.image_ids(h, w), sampling.image_ids(h, w, reference=True)])
    emb = torch.randn(batch, txt, presets.DEV_ENCODER_HIDDEN, generator=g)
    mask = torch.ones(batch, txt, dtype=torch.long)
    t = torch.tensor([0.7] * batch)
    return img, ids, torch.zeros(txt, 3), t, emb, t, mask


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_one_graph_per_block_class_for_every_size_and_batch_of_two_or_more(fresh_dynamo):
    """Single-stream blocks used to see two input layouts (the first one contiguous tensors, the others strided
    views of the previous block's joined sequence): two graphs at one shape. The first shape then compiled static
    and the second recompiled dynamic, and each new batch size added more."""
    dit = presets.build_dev_dit()
    rec = Recorder()
    fastpath.compile_blocks_(dit, backend=rec)
    with torch.inference_mode():
        dit(*_inputs())
        assert sorted(rec.graphs) == ["double", "single"]  # one graph each, at the first shape
        for kw in (dict(h=24, w=16), dict(h=16, w=40), dict(h=32, w=32, batch=4), dict(h=8, w=24, batch=3),
                   dict(batch=8)):
            dit(*_inputs(**kw))
        assert len(rec.graphs) == 2, rec.graphs  # new sizes, aspect ratios and batches: no recompile
        dit(*_inputs(batch=1))  # batch 1 (guidance off, n=1): torch specialises size 1, so once more
        dit(*_inputs(batch=1, h=24, w=8))
    assert sorted(rec.graphs) == ["double", "double", "single", "single"]
    assert torch._dynamo.config.recompile_limit >= fastpath.RECOMPILE_LIMIT


def test_a_token_count_equal_to_a_model_width_does_not_specialise(fresh_dynamo):
    """With duck sizing a token count equal to the hidden size (here 128 tokens = the dev DiT's width 128) was
    tied to that static width and the graph compiled static (seen: the next size recompiled)."""
    dit = presets.build_dev_dit()
    rec = Recorder()
    fastpath.compile_blocks_(dit, backend=rec)
    assert 2 * (16 // 2) * (16 // 2) == dit.inner_dim  # h=w=16 latents: 128 image tokens
    with torch.inference_mode():
        dit(*_inputs(h=16, w=16))
        dit(*_inputs(h=24, w=16))
    assert len(rec.graphs) == 2


def _edit(n=1, guidance=2.5, size=(96, 64), seed=1):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return EditRequest(image=image, prompt="add a hat", n=n, steps=1, guidance_scale=guidance, strength=1.0,
                       seed=seed)


def test_after_the_warm_up_no_request_compiles(fresh_dynamo, caplog):
    """The warm-up runs the batch shapes a server forms (n=1 without and with guidance, the largest n); after it,
    requests of other aspect ratios, n and guidance find their graphs: the worker never stalls to compile. A
    request that does compile is logged."""
    pipe = build_pipeline(Settings(preset="dev", size_level=256, device="cpu"))
    rec = Recorder()
    fastpath.compile_blocks_(pipe.dit, backend=rec)
    pipe.perf = dataclasses.replace(pipe.perf, compile=True)
    assert warmup_shapes(1) == [(1, False), (1, True)] and warmup_shapes(3) == [(1, False), (1, True), (3, True)]
    with caplog.at_level(logging.WARNING, logger="step1x_edit.pipeline.edit"):
        pipe.warmup([256], max_images=2)
        warmed = len(rec.graphs)
        assert warmed == 4 and "compiled" not in caplog.text  # {double, single} x {batch 1, batch >= 2}
        for req in (_edit(n=2, guidance=1.0, size=(64, 128)), _edit(size=(200, 60))):
            pipe.run([req])
        assert len(rec.graphs) == warmed and "compiled" not in caplog.text
        torch._dynamo.reset()  # forget the graphs: the next request compiles on the worker, and says so
        pipe.run([_edit()])
    assert len(rec.graphs) == warmed + 2 and "compiled 2 new graph(s) on the worker" in caplog.text


@pytest.mark.slow
def test_inductor_compiles_each_block_graph_once_across_sizes(fresh_dynamo):
    """The same with the real compiler (inductor on the CPU: minutes), which may add guards of its own; and the
    compiled model computes what the eager one does."""
    dit, plain = presets.build_dev_dit(), presets.build_dev_dit()
    before = fastpath.compiled_graphs()  # a process-wide count: earlier tests may have compiled
    fastpath.compile_blocks_(dit)
    with torch.inference_mode():
        for kw in (dict(), dict(h=24, w=16), dict(h=16, w=40, batch=4)):
            out, ref = dit(*_inputs(**kw)), plain(*_inputs(**kw))
            assert (out - ref).abs().max().item() <= 1e-5
    assert fastpath.compiled_graphs() - before == 2
