"""ControlNet through the one generate() core against diffusers' ControlNet pipelines, built
from the same tiny random weights (test-only reference): one ControlNet with a start / end
window, two (``MultiControlNetModel``, residuals summed), guess mode, and img2img."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import jitter
from noisecraft.models.controlnet import ControlNet
from noisecraft.pipelines import GenerateRequest, generate
from noisecraft.pipelines.control import ControlInput
from test_latent_pipeline import H, W, _diffusers_components, _image, _pil, tiny_model

HINT_CHANNELS = (4, 8, 8, 16)


def tiny_controlnet(model, seed: int) -> ControlNet:
    """A ControlNet for ``model``'s U-Net with every weight (zero convs too) jittered."""
    torch.manual_seed(seed)
    net = ControlNet.from_unet(model.unet, hint_channels=HINT_CHANNELS)
    return jitter(net, seed, std=0.1)


def to_diffusers(net: ControlNet):
    """The same weights as diffusers' ``ControlNetModel`` (its own original-layout converter)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    u = net.config
    theirs = ControlNetModel(
        in_channels=u.in_channels,
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=u.num_res_blocks,
        cross_attention_dim=u.context_dim,
        attention_head_dim=u.num_heads,
        norm_num_groups=u.norm_groups,
        conditioning_embedding_out_channels=HINT_CHANNELS,
    )
    sd = convert_controlnet_checkpoint(net.state_dict(), {"layers_per_block": u.num_res_blocks})
    theirs.load_state_dict(sd, strict=True)
    return theirs.eval()


def hint_image(seed: int):
    """An 8-bit RGB control image at the output size and the (1, 3, H, W) hint in [0, 1]
    diffusers' control-image processor makes of it."""
    im = _pil(_image(seed))
    hint = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return im, hint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model()
    nets = [tiny_controlnet(model, 11), tiny_controlnet(model, 12)]
    parts = _diffusers_components(model, tmp_path_factory.mktemp("tok"))
    return model, nets, [to_diffusers(n) for n in nets], parts


CASES = {
    # case: (units as (net index, hint seed, weight, start, end), guess mode, img2img)
    "one": ([(0, 5, 0.8, 0.25, 1.0)], False, False),
    "two": ([(0, 5, 0.7, 0.0, 0.75), (1, 6, 1.3, 0.25, 1.0)], False, False),
    "guess": ([(0, 5, 1.0, 0.0, 1.0)], True, False),
    "img2img": ([(1, 6, 0.9, 0.0, 0.6)], False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_image_as_diffusers_controlnet_pipeline(case, setup):
    """Same weights, same seed: diffusers' StableDiffusionControlNet(Img2Img)Pipeline and
    generate() agree within 2/255 (observed max 4e-6)."""
    import diffusers

    model, nets, theirs, parts = setup
    units, guess, img2img = CASES[case]
    prompt, negative, steps, cfg, seed = "the cat", "a dog", 4, 5.0, 21
    hints = [hint_image(h) for _, h, *_ in units]
    controlnet = [theirs[i] for i, *_ in units]
    kw = dict(
        prompt=prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=cfg,
        generator=[torch.Generator().manual_seed(seed)],
        output_type="pt",
        controlnet_conditioning_scale=[u[2] for u in units],
        control_guidance_start=[u[3] for u in units],
        control_guidance_end=[u[4] for u in units],
        guess_mode=guess,
    )
    req = dict(prompts=[prompt], negative_prompt=negative, steps=steps, cfg=cfg, seeds=[seed])
    images = [im for im, _ in hints]
    if len(units) == 1:  # a single ControlNetModel, not a list of one
        controlnet, images = controlnet[0], images[0]
        for key in ("controlnet_conditioning_scale", "control_guidance_start"):
            kw[key] = kw[key][0]
        kw["control_guidance_end"] = kw["control_guidance_end"][0]
    if img2img:
        init = _pil(_image(3))
        x = torch.from_numpy(np.asarray(init, dtype=np.float32)).permute(2, 0, 1)[None]
        pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=controlnet)
        kw.update(image=init, control_image=images, strength=0.7)
        req.update(init_image=x / 127.5 - 1, strength=0.7)
    else:
        pipe = diffusers.StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
        kw.update(image=images, height=H, width=W)
    with torch.no_grad():
        want = pipe(**kw).images
    controls = [
        ControlInput(nets[i], hint, weight, start, end, guess)
        for (i, _, weight, start, end), (_, hint) in zip(units, hints, strict=True)
    ]
    base = dict(n=1, sampler="euler", height=H, width=W, **req)
    got = (generate(model, GenerateRequest(**base, controls=controls)) / 2 + 0.5).clamp(0, 1)
    plain = (generate(model, GenerateRequest(**base)) / 2 + 0.5).clamp(0, 1)
    assert (got - plain).abs().max() > 0.02  # the control changed the image
    torch.testing.assert_close(got, want.float(), atol=2 / 255, rtol=0)
