"""How tests/data/before/ was made, at commit e31debc (before the DiT became a diffusers model).

dit.safetensors: the dev preset's DiT (seed 0) in bfloat16 (the fp32 file would be 9.5 MB), our parameter names.
edit-{0,1}.png: a seeded edit by the dev pipeline (seed 0 VAE and encoder) with that DiT upcast to fp32.
`tests/test_before_after.py` loads the file into today's classes and must reproduce the images exactly.
Kept for the record; it ran against the old API and is not run by the tests.
"""
import torch
from PIL import Image
from safetensors.torch import save_file

from step1x_edit.models import presets
from step1x_edit.pipeline.edit import build_pipeline
from step1x_edit.pipeline.types import EditRequest
from step1x_edit.settings import Settings

sd = {k: v.to(torch.bfloat16).contiguous() for k, v in presets.build_dev_dit(0).state_dict().items()}
save_file(sd, "tests/data/before/dit.safetensors")
pipe = build_pipeline(Settings(preset="dev", device="cpu", size_level=256))
pipe.dit.load_state_dict({k: v.float() for k, v in sd.items()})
req = EditRequest(image=Image.open("../shared/examples/0003.png"), prompt="Change image to anime style",
                  negative_prompt="blurry", n=2, steps=4, seed=7, size_level=256)
(res,) = pipe.run([req])
for i, img in enumerate(res.images):
    img.save(f"tests/data/before/edit-{i}.png")
print(res.seeds, res.images[0].size, res.text_tokens, res.image_tokens)
