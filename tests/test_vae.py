"""AutoencoderKL: LDM names, parity with diffusers (test-only), posterior math, loss, tiling.

Parity builds diffusers' ``AutoencoderKL`` with the same tiny block structure, loads our weights
through :func:`to_diffusers_state_dict` strictly and compares outputs; the key mapping is also
checked against diffusers' own LDM -> diffusers converter (``convert_ldm_vae_checkpoint``, the
code that reads ``first_stage_model.*`` of SD single files), so our names are LDM's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from noisecraft.errors import CheckpointError, ConfigError, NoisecraftError
from noisecraft.models.vae import (
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    from_diffusers_state_dict,
    to_diffusers_state_dict,
)
from noisecraft.models.vae_tiling import decode_latents, tile_starts, tiled_decode, tiled_encode
from noisecraft.training.vae_loss import (
    VAELoss,
    VAELossConfig,
    adaptive_weight,
    hinge_d_loss,
    latent_scaling_factor,
)

TINY = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
SMALL = VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
F8 = VAEConfig(base_channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=4)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vae(cfg: VAEConfig = TINY, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval()


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _diffusers_vae(cfg: VAEConfig) -> DiffusersAutoencoderKL:
    n = len(cfg.channel_mult)
    return DiffusersAutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
    )


# ---------------------------------------------------------------- config and names


def test_config_round_trip_presets_and_errors():
    sd = VAEConfig.sd()
    assert sd == VAEConfig() and sd.downsample_factor == 8 and sd.scaling_factor == 0.18215
    assert VAEConfig.sdxl().scaling_factor == 0.13025
    cfg = dataclasses.replace(TINY, shift_factor=0.1, double_z=False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mult"] == [1, 2]
    back = VAEConfig.from_dict(d)
    assert back == cfg and isinstance(back.channel_mult, tuple)
    with pytest.raises(ConfigError, match=r"'z_chanels' \(did you mean 'z_channels'\?\)"):
        VAEConfig.from_dict({**d, "z_chanels": 4})
    for bad in ({"base_channels": 0}, {"channel_mult": ()}, {"dropout": 1.0}):
        with pytest.raises(ConfigError):
            VAEConfig(**bad)
    with pytest.raises(ConfigError, match="scaling_factor"):
        VAEConfig(scaling_factor=0.0)


def test_ldm_key_names_and_layout():
    sd = _vae(F8).state_dict()
    for key in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",  # 8 -> 16 channels at level 2
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv2.bias",
        "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.mid.attn_1.norm.bias",
        "decoder.up.3.block.1.conv2.weight",  # num_res_blocks + 1 blocks per decoder level
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",  # 16 -> 8 channels at level 1
        "decoder.norm_out.bias",
    ):
        assert key in sd, key
    assert "encoder.down.3.downsample.conv.weight" not in sd  # last level does not downsample
    assert "decoder.up.0.upsample.conv.weight" not in sd  # full resolution does not upsample
    assert sd["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # 1x1 convs, as LDM
    assert sd["encoder.conv_out.weight"].shape[0] == 8 and sd["quant_conv.weight"].shape[:2] == (
        8,
        8,
    )
    # LDM's up list is indexed by level: up.3 (lowest resolution) has the most channels
    assert sd["decoder.up.3.block.0.conv1.weight"].shape[0] == 16
    assert sd["decoder.up.0.block.1.conv1.weight"].shape[0] == 8


# ---------------------------------------------------------------- diffusers parity


def test_parity_with_diffusers():
    ours = _vae(TINY)
    ref = _diffusers_vae(TINY).eval()
    ref.load_state_dict(ours.to_diffusers_state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)
        # the same generator draws the same posterior sample (diffusers' randn_tensor on CPU)
        a = post.sample(torch.Generator().manual_seed(3))
        b = ref_post.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.kl(), ref_post.kl(), atol=1e-4, rtol=1e-5)


def test_key_mapping_round_trip_and_ldm_converter():
    ours = _vae(F8)
    sd = ours.state_dict()
    diff = to_diffusers_state_dict(sd)
    assert len(diff) == len(sd)
    ref = _diffusers_vae(F8)
    ref.load_state_dict(diff, strict=True)
    assert diff["encoder.mid_block.attentions.0.to_q.weight"].shape == (16, 16)  # Linear
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in diff  # reversed: lowest first
    assert "decoder.up_blocks.2.resnets.0.conv_shortcut.weight" in diff  # LDM up.1
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" not in diff
    # diffusers' own converter of SD single files agrees with our rules
    ldm = {f"first_stage_model.{k}": v for k, v in sd.items()}
    conv = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    assert conv.keys() == diff.keys()
    assert all(torch.equal(conv[k], diff[k]) for k in diff)
    # round trip is bit-exact, both ways
    back = from_diffusers_state_dict(diff)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    ref_sd = ref.state_dict()
    again = to_diffusers_state_dict(from_diffusers_state_dict(ref_sd))
    assert again.keys() == ref_sd.keys() and all(torch.equal(again[k], ref_sd[k]) for k in again)
    # loading through the method
    fresh = _vae(F8, seed=5)
    fresh.load_diffusers_state_dict(ref_sd)
    assert all(torch.equal(fresh.state_dict()[k], sd[k]) for k in sd)


def test_key_mapping_legacy_names_and_unknown_keys():
    diff = _vae(SMALL).to_diffusers_state_dict()
    legacy = {
        k.replace("to_q", "query")
        .replace("to_k", "key")
        .replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in diff.items()
    }
    assert from_diffusers_state_dict(legacy).keys() == from_diffusers_state_dict(diff).keys()
    with pytest.raises(CheckpointError, match="'encoder.foo.weight'"):
        from_diffusers_state_dict({**diff, "encoder.foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'model.diffusion_model.x'"):
        to_diffusers_state_dict({"model.diffusion_model.x": torch.zeros(1)})


def test_sd_parameter_count_matches_diffusers():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.sd())
        ref = DiffusersAutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
        )
    assert _n_params(ours) == _n_params(ref) == 83_653_863
    mapped, ref_sd = ours.to_diffusers_state_dict(), ref.state_dict()
    assert mapped.keys() == ref_sd.keys()
    assert all(mapped[k].shape == ref_sd[k].shape for k in mapped)


# ---------------------------------------------------------------- posterior and scaling


def test_kl_closed_form_and_nll():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 5, 6, generator=g)
    other = DiagonalGaussian(torch.randn(3, 8, 5, 6, generator=g))
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), expected)
    r = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(
        post.kl(other), torch.distributions.kl_divergence(q, r).sum((1, 2, 3))
    )
    assert torch.allclose(post.kl(post), torch.zeros(3), atol=1e-5)
    s = post.sample(g)
    torch.testing.assert_close(post.nll(s), -q.log_prob(s).sum(dim=(1, 2, 3)))
    # logvar clamped to [-30, 20] as LDM
    wild = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], dim=1))
    assert wild.logvar.max() == 20.0
    # double_z=False: a deterministic posterior
    det = DiagonalGaussian(mean, deterministic=True)
    assert torch.equal(det.sample(g), mean) and torch.equal(det.kl(), torch.zeros(3))


def test_sample_reproducible_and_reparameterised():
    moments = torch.randn(2, 8, 4, 4, requires_grad=True)
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(8)))
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, post.mean + torch.exp(0.5 * post.logvar) * eps)
    assert torch.equal(post.mode(), moments[:, :4])
    a.sum().backward()  # z = mean + std * eps: gradients reach both halves of the moments
    assert moments.grad[:, :4].abs().min() > 0 and moments.grad[:, 4:].abs().sum() > 0


def test_encode_latents_and_decode_latents_apply_the_factors():
    vae = _vae(dataclasses.replace(SMALL, scaling_factor=0.25, shift_factor=0.5))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        torch.testing.assert_close(vae.encode_latents(x, sample=False), (post.mode() - 0.5) * 0.25)
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        torch.testing.assert_close(
            vae.encode_latents(x, generator=g1), (post.sample(g2) - 0.5) * 0.25
        )
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(vae.decode_latents(z), vae.decode(z / 0.25 + 0.5))
        torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)
        recon, posterior = vae(x, sample=False)
        torch.testing.assert_close(recon, vae.decode(posterior.mode()))
    plain = _vae(SMALL)  # no shift: plain multiplication by 0.18215
    with torch.no_grad():
        torch.testing.assert_close(
            plain.encode_latents(x, sample=False), plain.encode(x).mode() * 0.18215
        )


def test_shapes_double_z_and_size_errors():
    vae = _vae(F8)
    with torch.no_grad():
        post = vae.encode(torch.randn(1, 3, 24, 40))
        assert post.mean.shape == (1, 4, 3, 5)
        assert vae.decode(post.mode()).shape == (1, 3, 24, 40)
        with pytest.raises(ConfigError, match="30x40 is not a multiple of 8") as err:
            vae.encode(torch.randn(1, 3, 30, 40))
        assert "\n" not in str(err.value) and isinstance(err.value, NoisecraftError)
        with pytest.raises(ConfigError, match=r"\(batch, 3, height, width\)"):
            vae.encode(torch.randn(1, 1, 32, 32))
        with pytest.raises(ConfigError, match=r"\(batch, 4, height, width\)"):
            vae.decode(torch.randn(1, 3, 4, 4))
    det = _vae(dataclasses.replace(SMALL, double_z=False))
    assert det.quant_conv.weight.shape[:2] == (4, 4)
    with torch.no_grad():
        x = torch.randn(1, 3, 8, 8)
        p = det.encode(x)
        assert torch.equal(det.encode_latents(x), det.encode_latents(x, sample=False))
        assert torch.equal(p.kl(), torch.zeros(1))


def test_gradients_reach_every_parameter():
    vae = AutoencoderKL(dataclasses.replace(SMALL, dropout=0.1)).train()
    recon, post = vae(torch.randn(2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    (recon.square().mean() + post.kl().mean()).backward()
    dead = [n for n, p in vae.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


# ---------------------------------------------------------------- loss and training


def test_vae_loss_terms():
    vae = _vae(SMALL)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    recon, post = vae(x, generator=torch.Generator().manual_seed(0))
    out = VAELoss()(x, recon, post)
    rec = (x - recon).abs().sum() / 3
    torch.testing.assert_close(out.reconstruction, rec.detach())
    torch.testing.assert_close(out.kl, post.kl().mean().detach())
    torch.testing.assert_close(out.loss, rec + 1e-6 * post.kl().mean())
    assert out.adversarial == 0 and out.disc_weight == 0
    l2 = VAELoss(VAELossConfig(reconstruction="l2", kl_weight=0.5))(x, recon, post)
    torch.testing.assert_close(l2.loss, (x - recon).square().sum() / 3 + 0.5 * post.kl().mean())
    with pytest.raises(ConfigError, match="unknown reconstruction loss 'l3'"):
        VAELossConfig(reconstruction="l3")
    with pytest.raises(ConfigError, match="adversarial=True"):
        VAELoss().discriminator_loss(x, recon)


def test_adversarial_term_hinge_and_adaptive_weight():
    torch.manual_seed(0)
    vae = AutoencoderKL(SMALL)
    cfg = VAELossConfig(adversarial=True, disc_start=10, disc_channels=8, disc_layers=2)
    loss_fn = VAELoss(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, post = vae(x, generator=torch.Generator().manual_seed(0))
    early = loss_fn(x, recon, post, global_step=9, last_layer=vae.last_layer)
    assert early.adversarial == 0
    assert loss_fn.discriminator_loss(x, recon, global_step=9) == 0
    late = loss_fn(x, recon, post, global_step=10, last_layer=vae.last_layer)
    g_loss = -loss_fn.discriminator(recon).mean()
    torch.testing.assert_close(late.adversarial, g_loss.detach())
    rec = (x - recon).abs().sum() / 2
    gr = torch.autograd.grad(rec, vae.last_layer, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, vae.last_layer, retain_graph=True)[0]
    expected = 0.5 * (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4)
    torch.testing.assert_close(late.disc_weight, expected)
    torch.testing.assert_close(late.loss, rec + 1e-6 * post.kl().mean() + expected * g_loss)
    late.loss.backward()
    assert vae.encoder.conv_in.weight.grad is not None
    # the discriminator's own loss: hinge, reconstructions detached
    d_loss = loss_fn.discriminator_loss(x, recon, global_step=10)
    d = loss_fn.discriminator
    torch.testing.assert_close(d_loss, hinge_d_loss(d(x), d(recon.detach())))
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.25 + 0.5)))
    w = torch.ones(3, requires_grad=True)
    a = adaptive_weight((2 * w).sum(), (4 * w).sum(), w, disc_weight=0.5)
    torch.testing.assert_close(a, torch.tensor(0.5 * 2 / (4 + 1e-4)))


def _digits(n: int = 256) -> torch.Tensor:
    datasets = pytest.importorskip("sklearn.datasets")
    images = torch.tensor(datasets.load_digits().images[:n], dtype=torch.float32) / 16.0
    return F.interpolate(images[:, None], size=(16, 16), mode="bilinear") * 2 - 1


def test_tiny_vae_learns_digits():
    x = _digits()
    cfg = VAEConfig(
        in_channels=1,
        out_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        z_channels=4,
        norm_groups=8,
    )
    vae = _vae(cfg).train()
    loss_fn = VAELoss(VAELossConfig(kl_weight=1e-6))
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    held_out = x[:64]

    def eval_rec() -> float:
        with torch.no_grad():
            recon, _ = vae(held_out, sample=False)
            return float((recon - held_out).abs().mean())

    before = eval_rec()
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        batch = x[torch.randint(0, len(x), (32,), generator=g)]
        recon, post = vae(batch, generator=g)
        out = loss_fn(batch, recon, post, global_step=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = eval_rec()
    assert after < 0.5 * before, (before, after)


def test_latent_scaling_factor_gives_unit_std():
    vae = _vae(SMALL)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    batches = [x[:4], (x[4:], torch.zeros(2))]  # tensors or (images, labels) tuples
    factor = latent_scaling_factor(vae, batches, sample=False)
    scaled = dataclasses.replace(SMALL, scaling_factor=factor)
    vae2 = AutoencoderKL(scaled).eval()
    vae2.load_state_dict(vae.state_dict())
    with torch.no_grad():
        z = vae2.encode_latents(x, sample=False)
    assert abs(float(z.std()) - 1.0) < 1e-5
    # with sampling (LDM's default) the same generator reproduces the same factor
    f1 = latent_scaling_factor(vae, [x], generator=torch.Generator().manual_seed(1))
    f2 = latent_scaling_factor(vae, [x], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        zs = vae.encode(x).sample(torch.Generator().manual_seed(1))
    assert f1 == f2 and abs(f1 * float(zs.std()) - 1.0) < 1e-5
    with pytest.raises(NoisecraftError, match="at least one"):
        latent_scaling_factor(vae, [])


# ---------------------------------------------------------------- tiling


def _column_gradient(img: torch.Tensor) -> torch.Tensor:
    """Mean |d/dx| between each column and the next (length W - 1)."""
    return (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))


def test_tile_starts():
    assert tile_starts(24, 32, 8) == [0]
    assert tile_starts(48, 24, 8) == [0, 12, 24]
    for size, tile, overlap in [(100, 16, 4), (64, 64, 8), (65, 16, 0), (1000, 64, 8)]:
        s = tile_starts(size, tile, overlap)
        assert s[0] == 0 and s[-1] + tile == size
        assert all(0 < b - a <= tile - overlap for a, b in zip(s, s[1:], strict=False))


def test_tiled_decode_close_to_untiled():
    vae = _vae(SMALL)
    z = torch.randn(2, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(z)
        tiled = tiled_decode(vae, z, tile_latent=24, overlap_latent=8)
        hard = tiled_decode(vae, z, tile_latent=24, overlap_latent=0)  # two tiles, no blend
        one = tiled_decode(vae, z, tile_latent=64, overlap_latent=8)  # one tile: exact
    assert tiled.shape == full.shape
    assert torch.equal(one, full)
    span = float(full.max() - full.min())
    err = (tiled - full).abs()
    assert float(err.max()) < 0.15 * span and float(err.mean()) < 0.02 * span
    assert float(err.mean()) < float((hard - full).abs().mean())


def test_odd_latent_sizes_decode_whole_and_in_tiles():
    """A U-Net now takes any latent size, so the VAE gets odd ones (SD: a side of 8 x an odd
    number). Whole: encode and decode equal diffusers' at 7x5 latents; tiled: 47x45 latents
    (uneven tile starts) decode close to the untiled image, as even ones do."""
    ours = _vae(TINY)
    ref = _diffusers_vae(TINY).eval()
    ref.load_state_dict(ours.to_diffusers_state_dict(), strict=True)
    x = torch.rand(1, 3, 14, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(1, 4, 7, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = ours.encode(x)
        assert post.mean.shape == (1, 4, 7, 5)
        torch.testing.assert_close(post.mean, ref.encode(x).latent_dist.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)
    vae = _vae(SMALL)
    z = torch.randn(1, 4, 47, 45, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(z)
        tiled = tiled_decode(vae, z, tile_latent=24, overlap_latent=8)
        forced = decode_latents(vae, vae.scale_latents(z), tiled=True)  # forced_tile: 32
    assert tiled.shape == forced.shape == full.shape == (1, 3, 94, 90)
    span = float(full.max() - full.min())
    for out in (tiled, forced):
        err = (out - full).abs()
        assert float(err.max()) < 0.15 * span and float(err.mean()) < 0.02 * span


def test_tiled_encode_close_to_untiled():
    vae = _vae(SMALL)
    x = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        full = vae.encode(x)
        tiled = tiled_encode(vae, x, tile=48, overlap=16)
    assert tiled.mean.shape == full.mean.shape
    span = float(full.mean.max() - full.mean.min())
    assert float((tiled.mean - full.mean).abs().max()) < 0.15 * span
    assert float((tiled.logvar - full.logvar).abs().mean()) < 0.02 * float(
        full.logvar.max() - full.logvar.min()
    )


def test_tiled_decode_has_no_seams():
    vae = _vae(SMALL)
    f, n, tile, overlap = 2, 48, 24, 8
    # smooth latents: the picture varies slowly, so a seam would stand out
    coarse = torch.randn(2, 4, n // 4, n // 4, generator=torch.Generator().manual_seed(0))
    z = F.interpolate(coarse, size=(n, n), mode="bicubic")
    with torch.no_grad():
        full = vae.decode(z)

        def seams(overlap_latent: int) -> tuple[float, float, float]:
            out = tiled_decode(vae, z, tile_latent=tile, overlap_latent=overlap_latent)
            starts = tile_starts(n, tile, overlap_latent)
            # gradient index b is between pixel columns b and b + 1: each tile's first / last
            edges = {s * f - 1 for s in starts[1:]} | {(s + tile) * f - 1 for s in starts[:-1]}
            border = sorted(edges)
            grad, grad_full = _column_gradient(out), _column_gradient(full)
            elsewhere = torch.ones_like(grad, dtype=torch.bool)
            elsewhere[border] = False
            err = _column_gradient(out - full)
            return (
                float(err[border].max() / err.median()),  # jump in the tiling error
                float(grad[border].max() / grad[elsewhere].max()),
                float(grad[border].max() / grad_full[border].max()),
            )

        hard, blended = seams(0), seams(overlap)
    assert hard[0] > 2.0 and hard[2] > 1.5  # the measure sees the seam of a hard cut...
    assert blended[0] < 1.5 and blended[2] < 1.25  # ...and none after blending
    assert blended[1] <= 1.0  # gradient at tile borders not larger than anywhere else


def test_tiling_size_errors():
    vae = _vae(F8)
    with pytest.raises(ConfigError, match="36x64 is not a multiple of 8"):
        tiled_encode(vae, torch.randn(1, 3, 36, 64), tile=32, overlap=8)
    with pytest.raises(ConfigError, match="multiples of 8"):
        tiled_encode(vae, torch.randn(1, 3, 64, 64), tile=36, overlap=8)
    with pytest.raises(ConfigError, match=r"overlap must be an integer in \[0, tile\)"):
        tiled_decode(vae, torch.randn(1, 4, 8, 8), tile_latent=4, overlap_latent=4)
    with pytest.raises(ConfigError, match=r"\(batch, 4, height, width\)"):
        tiled_decode(vae, torch.randn(1, 3, 8, 8))
    with torch.no_grad():  # f = 8 tiles on a 64 x 64 image: latents 8 x 8, tiles of 4
        post = tiled_encode(vae, torch.randn(1, 3, 64, 64), tile=32, overlap=16)
        assert post.mean.shape == (1, 4, 8, 8)
        assert tiled_decode(vae, post.mode(), tile_latent=4, overlap_latent=2).shape == (
            1,
            3,
            64,
            64,
        )
