"""LoRA adapters on the DiT (models/lora_format.py, models/lora_adapters.py), on the golden v1.1 model.

The reference for every adapter output is the official-layout weights with the LoRA delta merged by hand
(tests/lora_fixtures.py), loaded by the normal loader: the adapter path must match it within 1e-5 in fp32, with
every fast path that takes adapters (fused QKV, FP8 weights, regional compile through hot-swap).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from lora_fixtures import (OUTSIDE, block_layers, kohya_key, make_kohya, merge_by_hand,  # noqa: E402,F401
                           one_thread, save)

from step1x_edit.models import fastpath  # noqa: E402
from step1x_edit.models.lora_adapters import LoraAdapters, LoraLibrary  # noqa: E402
from step1x_edit.models.weights import DIT_RULES, dit_config_from_dict, load_dit, to_official  # noqa: E402
from step1x_edit.pipeline import sampling  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def golden(golden_dir, one_thread):  # noqa: F811 - the fixture imported above
    g = golden_dir / "tiny-a-v1p1"
    meta = json.loads((g / "cases.json").read_text())
    cfg = dit_config_from_dict(meta["dit_params"], meta["connector_params"], "v1.1")
    t = load_file(str(g / "cases.safetensors"))
    p = "dit_fwd."
    tgt, ref = t[p + "latent_target"], t[p + "latent_ref"]
    h, w = tgt.shape[-2:]
    img = torch.cat([sampling.pack(tgt), sampling.pack(ref)], dim=1)
    ids = torch.cat([sampling.image_ids(h, w), sampling.image_ids(h, w, reference=True, version="v1.1")])
    args = (img, ids, t[p + "txt_ids"][0], t[p + "timesteps"], t[p + "llm_embedding"], t[p + "t_vec"], t[p + "mask"])

    class Golden:
        path = g / "dit.safetensors"
        config = cfg
        inputs = args

        def load(self, **kw):
            return load_dit(self.path, cfg, version="v1.1", **kw)[0]

    golden = Golden()
    golden.official = to_official(golden.load(), DIT_RULES)
    golden.layers = block_layers(cfg.depth, cfg.depth_single_blocks)
    return golden


def forward(dit, inputs):
    with torch.no_grad():
        return dit(*inputs)


def adapters(dit, cfg, directory, cache_size=8):
    return LoraAdapters(dit, LoraLibrary(directory, cfg), cache_size, slots=4)


def run(ad, choices, inputs):
    with ad.applied(choices), torch.no_grad():
        return ad.dit(*inputs)


def merged_model(golden, tmp_path, lora, scale, name="merged"):
    """The golden DiT with the delta merged by hand into its official weights, loaded by the normal loader."""
    path = save(merge_by_hand(golden.official, lora, scale), tmp_path / f"{name}.safetensors")
    return load_dit(path, golden.config, version="v1.1")[0]


def test_kohya_lora_equals_merging_the_delta_by_hand(golden, tmp_path):
    # every block layer kind, double and single, plus the embedders and the final layer (whose modulation halves
    # are swapped between the official and our layout)
    lora = make_kohya(golden.official, golden.layers + list(OUTSIDE), rank=4, alpha=2.0, seed=1)
    save(lora, tmp_path / "loras" / "fix-hand.safetensors")
    ad = adapters(golden.load(), golden.config, tmp_path / "loras")
    base = forward(ad.dit, golden.inputs)
    out = run(ad, [("fix-hand", 0.8)], golden.inputs)
    want = forward(merged_model(golden, tmp_path, lora, 0.8), golden.inputs)
    assert (out - base).abs().max() > 1e-2  # the adapter changes the output...
    assert (out - want).abs().max() <= TOL  # ...exactly as merging it into the official weights does


def test_scale_zero_no_adapter_and_switching_back_give_the_base_output_exactly(golden, tmp_path):
    save(make_kohya(golden.official, golden.layers, seed=2), tmp_path / "a.safetensors")
    ad = adapters(golden.load(), golden.config, tmp_path)
    base = forward(ad.dit, golden.inputs)
    assert torch.equal(run(ad, [], golden.inputs), base)
    assert torch.equal(run(ad, [("a", 0.0)], golden.inputs), base)  # PEFT at weight 0 adds exact zeros
    adapted = run(ad, [("a", 1.5)], golden.inputs)
    assert not torch.allclose(adapted, base)
    assert torch.equal(run(ad, [], golden.inputs), base)  # switched back: nothing of it left
    assert torch.equal(forward(ad.dit, golden.inputs), base)  # outside any batch too
    assert torch.equal(run(ad, [("a", 1.5)], golden.inputs), adapted)


def test_several_adapters_add_up_in_any_order(golden, tmp_path):
    a = make_kohya(golden.official, golden.layers, rank=4, alpha=8.0, seed=3)
    b = make_kohya(golden.official, golden.layers[::2], rank=6, alpha=None, seed=4)  # no alpha: alpha = rank
    save(a, tmp_path / "loras" / "a.safetensors")
    save(b, tmp_path / "loras" / "b.safetensors")
    ad = adapters(golden.load(), golden.config, tmp_path / "loras")
    out = run(ad, [("a", 0.5), ("b", -1.25)], golden.inputs)
    both = merge_by_hand(merge_by_hand(golden.official, a, 0.5), b, -1.25)
    want = forward(load_dit(save(both, tmp_path / "both.safetensors"), golden.config, version="v1.1")[0],
                   golden.inputs)
    assert (out - want).abs().max() <= TOL
    assert (run(ad, [("b", -1.25), ("a", 0.5)], golden.inputs) - out).abs().max() <= TOL


def peft_layout(golden, lora):
    """The same LoRA as a diffusers/PEFT file (our layer names, `transformer.` prefix, alpha in the metadata):
    split by hand, with the down matrix of a fused official layer repeated on each part."""
    from step1x_edit.models.lora_format import module_maps

    _, official = module_maps(golden.config)
    sd, alphas = {}, {}
    for layer, target in official.items():
        k = kohya_key(layer)
        if k + ".lora_down.weight" not in lora:
            continue
        down, up = lora[k + ".lora_down.weight"], lora[k + ".lora_up.weight"]
        if target.swap_halves:
            first, second = up.chunk(2)
            up = torch.cat([second, first])
        for (name, _), part in zip(target.pieces, up.split([rows for _, rows in target.pieces])):
            sd[f"transformer.{name}.lora_A.weight"] = down.clone()
            sd[f"transformer.{name}.lora_B.weight"] = part.clone()
            alphas[name] = float(lora[k + ".alpha"])
    rank = next(iter(lora.values())).shape[0]
    meta = {"r": rank, "lora_alpha": rank, "alpha_pattern": {"^" + n: a for n, a in alphas.items()}}
    return sd, {"lora_adapter_metadata": json.dumps(meta)}


def test_diffusers_peft_layout_loads_like_the_official_one(golden, tmp_path):
    lora = make_kohya(golden.official, golden.layers + ["final_layer.adaLN_modulation.1"], rank=4, alpha=3.0, seed=5)
    save(lora, tmp_path / "loras" / "kohya.safetensors")
    sd, meta = peft_layout(golden, lora)
    save(sd, tmp_path / "loras" / "peft.safetensors", metadata=meta)
    ad = adapters(golden.load(), golden.config, tmp_path / "loras")
    assert ad.library.files["peft"].layout == "peft" and ad.library.files["kohya"].layout == "kohya"
    want = forward(merged_model(golden, tmp_path, lora, 0.7), golden.inputs)
    assert (run(ad, [("peft", 0.7)], golden.inputs) - want).abs().max() <= TOL
    assert (run(ad, [("kohya", 0.7)], golden.inputs) - want).abs().max() <= TOL


def test_fused_qkv_takes_adapters_exactly(golden, tmp_path):
    """fuse_qkv replaces to_q/k/v by one layer: an official qkv LoRA (one shared down matrix) lands on it at its
    own rank; a PEFT file with separate q/k/v LoRAs as a block-structured one. Both equal the hand merge."""
    lora = make_kohya(golden.official, golden.layers, rank=4, alpha=2.0, seed=6)
    save(lora, tmp_path / "loras" / "kohya.safetensors")
    sd, meta = peft_layout(golden, lora)
    g = torch.Generator().manual_seed(7)  # different down matrices for q, k and v
    for key in [k for k in sd if k.endswith(("to_k.lora_A.weight", "add_v_proj.lora_A.weight"))]:
        sd[key] = torch.randn(sd[key].shape, generator=g) * 0.1
    save(sd, tmp_path / "loras" / "peft.safetensors", metadata=meta)
    plain = adapters(golden.load(), golden.config, tmp_path / "loras")
    fused_dit = golden.load()
    assert fastpath.fuse_qkv_(fused_dit) > 0
    fused = adapters(fused_dit, golden.config, tmp_path / "loras")
    want = forward(merged_model(golden, tmp_path, lora, 0.9), golden.inputs)
    assert (run(fused, [("kohya", 0.9)], golden.inputs) - want).abs().max() <= TOL
    assert fused_dit.transformer_blocks[0].attn.to_qkv.lora_A[fused._loaded["kohya"]].weight.shape[0] == 4
    for choices in ([("peft", 0.9)], [("kohya", 0.5), ("peft", -0.5)]):
        assert (run(fused, choices, golden.inputs) - run(plain, choices, golden.inputs)).abs().max() <= TOL
    base = forward(golden.load(), golden.inputs)
    assert (run(fused, [], golden.inputs) - base).abs().max() <= TOL


def test_fp8_weights_take_adapters(golden, tmp_path):
    """dit_fp8 keeps block weights in float8 (upcast per matmul): the adapters stay in the compute dtype, and the
    result equals the hand merge into the float8-rounded official weights."""
    lora = make_kohya(golden.official, golden.layers, rank=4, alpha=2.0, seed=8)
    save(lora, tmp_path / "loras" / "a.safetensors")
    dit = golden.load(fp8=True)
    rounded = {k: v.float() for k, v in to_official(dit, DIT_RULES).items()}  # float8 -> float32 is exact
    ad = adapters(dit, golden.config, tmp_path / "loras")
    out = run(ad, [("a", 1.0)], golden.inputs)
    layer = dit.single_transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert layer.lora_A[ad._loaded["a"]].weight.dtype == torch.float32
    merged = load_dit(save(merge_by_hand(rounded, lora, 1.0), tmp_path / "m8.safetensors"), golden.config,
                      version="v1.1")[0]
    assert (out - forward(merged, golden.inputs)).abs().max() <= TOL


def test_the_cache_keeps_at_most_its_size(golden, tmp_path):
    for i, seed in enumerate((9, 10, 11)):
        save(make_kohya(golden.official, golden.layers, seed=seed), tmp_path / f"l{i}.safetensors")
    ad = adapters(golden.load(), golden.config, tmp_path, cache_size=2)
    first = run(ad, [("l0", 1.0)], golden.inputs)
    run(ad, [("l1", 1.0)], golden.inputs)
    run(ad, [("l2", 1.0)], golden.inputs)  # l0, the least recently used, goes
    assert list(ad._loaded) == ["l1", "l2"] and len(ad.dit.peft_config) == 2 and ad.evictions == 1
    assert torch.equal(run(ad, [("l0", 1.0)], golden.inputs), first)  # reloaded on use, same result
    assert ad.loads == 4


def test_hot_swap_never_recompiles_when_adapters_switch(golden, tmp_path):
    """With regional compile, adapters are hot-swapped into slots prepared before compiling. A backend that counts
    its compilations (dynamo decides when to recompile, whatever the backend) sees none after each variant (no
    adapter, one, two) was met once, while the outputs equal the eager adapters' exactly."""
    save(make_kohya(golden.official, golden.layers[:5] + ["single_blocks.0.linear1"], rank=4, seed=12),
         tmp_path / "loras" / "a.safetensors")
    save(make_kohya(golden.official, golden.layers[3:9] + ["single_blocks.1.linear2"], rank=8, seed=13),
         tmp_path / "loras" / "b.safetensors")
    eager = adapters(golden.load(), golden.config, tmp_path / "loras")
    swap = adapters(golden.load(), golden.config, tmp_path / "loras")
    swap.prepare_hotswap()
    compiled = []
    torch._dynamo.reset()
    swap.dit.compile_repeated_blocks(backend=lambda gm, example_inputs: compiled.append(gm) or gm.forward)
    plan = [[], [("a", 0.8)], [("a", 1.0), ("b", -0.5)], [("b", 2.0)], [], [("a", 0.8)], [("b", 2.0), ("a", 0.3)],
            [("a", 1.0), ("b", -0.5)], []]
    for i, choices in enumerate(plan):
        before = len(compiled)
        out = run(swap, choices, golden.inputs)
        assert torch.equal(out, run(eager, choices, golden.inputs)), choices
        if i >= 3:
            assert len(compiled) == before, f"recompiled for {choices}"
    assert len(compiled) > 0 and swap.swaps >= 5
    torch._dynamo.reset()


REFUSALS = {
    "text encoder": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 8)},
                     "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "text-encoder"),
    "unknown module": ({"lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": (4, 128)},
                       "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight", "no such layer"),
    "rank mismatch": ({"lora_unet_single_blocks_0_linear2.lora_down.weight": (4, 640),
                       "lora_unet_single_blocks_0_linear2.lora_up.weight": (128, 8)},
                      "lora_unet_single_blocks_0_linear2.lora_up.weight", "rank mismatch"),
    "wrong width": ({"lora_unet_single_blocks_0_linear2.lora_down.weight": (4, 64),
                     "lora_unet_single_blocks_0_linear2.lora_up.weight": (128, 4)},
                    "lora_unet_single_blocks_0_linear2.lora_down.weight", "takes 640 inputs"),
    "LoHa": ({"lora_unet_single_blocks_0_linear2.hada_w1_a": (4, 64)}, "lora_unet_single_blocks_0_linear2.hada_w1_a",
             "not a LoRA tensor"),
    "up missing": ({"lora_unet_single_blocks_0_linear2.lora_down.weight": (4, 640)},
                   "lora_unet_single_blocks_0_linear2.lora_down.weight", "no lora_up"),
    "peft unknown module": ({"transformer.blocks.0.attn.to_q.lora_A.weight": (4, 128)},
                            "transformer.blocks.0.attn.to_q.lora_A.weight", "no Linear layer"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_files_that_do_not_fit_are_refused_naming_the_file_and_key(golden, tmp_path, case):
    shapes, key, why = REFUSALS[case]
    path = save({k: torch.zeros(s) for k, s in shapes.items()}, tmp_path / "bad.safetensors")
    save(make_kohya(golden.official, golden.layers[:2]), tmp_path / "good.safetensors")
    library = LoraLibrary(tmp_path, golden.config)
    assert library.names == ["good"]
    with pytest.raises(ValueError) as err:
        library.check(["bad"])
    message = str(err.value)
    assert message.startswith("loras: adapter 'bad' cannot be used: ") and str(path) in message
    assert repr(key) in message and why in message


def test_unknown_names_list_what_exists(golden, tmp_path):
    save(make_kohya(golden.official, golden.layers[:2]), tmp_path / "fix-hand.safetensors")
    (tmp_path / "notes.txt").write_text("not an adapter")
    library = LoraLibrary(tmp_path, golden.config)
    for name in ("nope", "../fix-hand", str(tmp_path / "fix-hand.safetensors"), "fix-hand.safetensors"):
        with pytest.raises(ValueError, match=r"^loras: unknown adapter .*; available: fix-hand$"):
            library.check([name])


def test_corrupt_tensors_are_refused_on_first_use(golden, tmp_path):
    lora = make_kohya(golden.official, golden.layers[:3], seed=14)
    lora[kohya_key(golden.layers[1]) + ".lora_up.weight"][0, 0] = float("nan")
    save(lora, tmp_path / "nan.safetensors")
    ad = adapters(golden.load(), golden.config, tmp_path)
    base = forward(ad.dit, golden.inputs)
    with pytest.raises(ValueError, match="NaN/Inf"):
        run(ad, [("nan", 1.0)], golden.inputs)
    with pytest.raises(ValueError, match="cannot be used: .*nan.safetensors.*NaN/Inf"):
        ad.library.check(["nan"])
    assert torch.equal(forward(ad.dit, golden.inputs), base)


def test_adapters_first_used_in_inference_mode_work_outside_it(golden, tmp_path):
    """The pipeline's run is in inference mode; adapters it loads must still switch outside it (PEFT toggles their
    requires_grad, which inference tensors refuse there)."""
    save(make_kohya(golden.official, golden.layers, seed=15), tmp_path / "a.safetensors")
    save(make_kohya(golden.official, golden.layers, seed=16), tmp_path / "b.safetensors")
    ad = adapters(golden.load(), golden.config, tmp_path)
    with torch.inference_mode():
        inside = run(ad, [("a", 1.0)], golden.inputs)
    assert torch.equal(run(ad, [("a", 1.0)], golden.inputs), inside)
    run(ad, [("b", 1.0)], golden.inputs)
