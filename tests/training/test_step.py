"""The training step: padding invariance, a falling loss on a fixed batch, only adapter weights move, the
v-prediction target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from synthetic_data import write_authors_layout

from mipadapter.config import AdapterConfig
from mipadapter.modeling import MIPAdapter
from mipadapter.testing import (
    TINY_SD15,
    TINY_SDXL,
    tiny_checkpoint_files,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
from mipadapter.training.batching import Collator, SubjectDataset
from mipadapter.training.components import build_adapter, components_from_pipeline, set_trainable
from mipadapter.training.config import FilterConfig, ModelConfig
from mipadapter.training.samples import SampleSettings
from mipadapter.training.sources import SubjectRules, authors_candidates, build_index
from mipadapter.training.step import AdapterUNet, FrozenModels, encode_latents, training_loss
from mipadapter.training.text import TextConditioner


@pytest.fixture(scope="module")
def unet64():
    torch.manual_seed(0)
    unet = tiny_sdxl_pipeline().unet.double()
    config = AdapterConfig("basic", TINY_SDXL.basic_image_encoder.projection_dim, 96, 4, text_weight=True)
    adapter = MIPAdapter.for_unet(unet, config).double()
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    adapter.attach(unet)
    yield unet, adapter
    adapter.detach()


@pytest.mark.parametrize("rule", ["official", "paper"])
def test_padded_subjects_change_nothing(unet64, rule):
    """A 2-subject sample padded to 3 subjects gives the same predictions (to float64 rounding)."""
    unet, adapter = unet64
    model = AdapterUNet(unet, adapter, rule)
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    latents, timesteps, prompt = rand(1, 4, 8, 8), torch.tensor([500]), rand(1, 77, 96)
    added = {
        "text_embeds": rand(1, 32),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=torch.float64),
    }
    features, names = rand(1, 2, 40), rand(1, 2, 2, 96)
    name_mask = torch.tensor([[[True, False], [True, True]]])
    alone = model(
        latents, timesteps, prompt, added, features, torch.ones(1, 2, dtype=torch.bool), names, name_mask
    )
    padded = model(
        latents, timesteps, prompt, added,
        torch.cat([features, rand(1, 1, 40)], 1), torch.tensor([[True, True, False]]),
        torch.cat([names, rand(1, 1, 2, 96)], 1), torch.cat([name_mask, torch.tensor([[[True, False]]])], 1),
    )  # fmt: skip
    torch.testing.assert_close(padded, alone, rtol=1e-12, atol=1e-13)
    # the same sample inside a batch beside a 3-subject sample
    other = [rand(1, 4, 8, 8), rand(1, 77, 96), rand(1, 3, 40), rand(1, 3, 2, 96)]
    batched = model(
        torch.cat([latents, other[0]]), torch.tensor([500, 300]), torch.cat([prompt, other[1]]),
        {k: torch.cat([v, v]) for k, v in added.items()},
        torch.cat([torch.cat([features, rand(1, 1, 40)], 1), other[2]]),
        torch.tensor([[True, True, False], [True, True, True]]),
        torch.cat([torch.cat([names, rand(1, 1, 2, 96)], 1), other[3]]),
        torch.cat([torch.cat([name_mask, torch.tensor([[[True, False]]])], 1), torch.ones(1, 3, 2, dtype=torch.bool)]),
    )  # fmt: skip
    torch.testing.assert_close(batched[:1], alone, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def fixed_batch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step")
    write_authors_layout(tmp / "data", 4)
    pipe = tiny_sdxl_pipeline()
    encoder, _ = TINY_SDXL.basic_image_encoder.build()
    files = tiny_checkpoint_files(tmp / "ckpt", pipe, dtype=None)
    components = components_from_pipeline(pipe, encoder)
    records, _ = build_index(
        *authors_candidates(tmp / "data", None), SubjectRules(FilterConfig().object_filter(), 0.0, 1, 3)
    )
    settings = SampleSettings(64, components.reference_size, drop_text=0, drop_image=0, drop_both=0)
    dataset = SubjectDataset(records, settings)
    batch = Collator(components.tokenizers, components.reference_size)([dataset[(i, i)] for i in range(2)])
    return components, files, batch


def test_loss_falls_and_only_trainable_parameters_change(fixed_batch):
    components, files, batch = fixed_batch
    config = ModelConfig(base_model="-", image_encoder="-", adapter_init=str(files.basic_bin))
    adapter = build_adapter(config, components.unet, components.image_encoder)
    params = set_trainable(adapter, train_image_proj=False)
    trainable = {name for name, p in adapter.named_parameters() if p.requires_grad}
    assert trainable and all(("to_k_ip" in n or "to_v_ip" in n or "text_to_weight" in n) for n in trainable)
    frozen_modules = {
        "unet": components.unet, "vae": components.vae, "image_encoder": components.image_encoder,
        "text_encoder": components.text_encoders[0], "text_encoder_2": components.text_encoders[1],
    }  # fmt: skip
    before = {
        f"{key}.{name}": t.detach().clone()
        for key, module in frozen_modules.items()
        for name, t in module.state_dict().items()
    }
    before.update({f"adapter.{n}": t.detach().clone() for n, t in adapter.state_dict().items()})
    adapter.attach(components.unet)
    try:
        model = AdapterUNet(components.unet, adapter, "official")
        frozen = FrozenModels(
            components.vae, TextConditioner(components.text_encoders, "sdxl"), components.image_encoder,
            components.noise_scheduler, uses_hidden_states=False,
        )  # fmt: skip
        optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
        losses = []
        for _ in range(30):
            generator = torch.Generator().manual_seed(0)  # the same noise and timesteps every step
            loss = training_loss(model, frozen, batch, generator)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        adapter.detach()
    assert losses[-1] < 0.8 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])
    after = {
        f"{key}.{name}": t
        for key, module in frozen_modules.items()
        for name, t in module.state_dict().items()
    }
    after.update({f"adapter.{n}": t for n, t in adapter.state_dict().items()})
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"adapter.{n}" for n in trainable}


@pytest.mark.parametrize("how", ["pytorch", "zeros"])
def test_an_h94_start_gets_the_gate_the_config_asks_for(fixed_batch, how):
    """An h94 file has no text_to_weight; the authors' training keeps nn.Linear's own init for it
    (their load is strict=False), ``zeros`` is the option. Guards a gate always zeroed or never set
    (the exact draw against nn.Linear is pinned in tests/modeling/test_adapter.py)."""
    components, files, _ = fixed_batch
    config = ModelConfig(base_model="-", image_encoder="-", adapter_init=str(files.basic_bin), text_weight_init=how)
    adapter = build_adapter(config, components.unet, components.image_encoder)
    for layer in adapter.layer_specs:
        gate = adapter.processor(layer.name).text_to_weight.weight
        if how == "zeros":
            assert torch.count_nonzero(gate) == 0
        else:
            assert torch.count_nonzero(gate) == gate.numel() and gate.abs().max() <= layer.hidden_size**-0.5
            assert gate.std() > 0.2 * layer.hidden_size**-0.5  # spread over the range, not a constant
class Capturing:
    """Runs the model and keeps what it was given and what it predicted."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, noisy, timesteps, *args):
        self.noisy, self.timesteps, self.args = noisy, timesteps, args
        self.prediction = self.model(noisy, timesteps, *args)
        return self.prediction


def captured_loss(
    tmp_path, arch: str, prediction_type: str, weight_dtype=torch.float32, projection: str = "basic", device=None,
    **options,
):  # fmt: skip
    """One training_loss on a real 2-sample batch of a tiny ``arch`` model with ``prediction_type``
    (everything but the VAE in ``weight_dtype``) and a ``basic`` or ``plus`` adapter, models and batch on
    ``device`` (None: where they are built, the CPU); returns (loss, the Capturing model, the scheduler,
    the batch, the VAE)."""
    spec, build = (TINY_SDXL, tiny_sdxl_pipeline) if arch == "sdxl" else (TINY_SD15, tiny_sd15_pipeline)
    write_authors_layout(tmp_path / "data", 2)
    encoder, _ = spec.basic_image_encoder.build()
    components = components_from_pipeline(build(), encoder)
    records, _ = build_index(
        *authors_candidates(tmp_path / "data", None), SubjectRules(FilterConfig().object_filter(), 0.0, 1, 3)
    )
    settings = SampleSettings(64, components.reference_size, drop_text=0, drop_image=0, drop_both=0)
    dataset = SubjectDataset(records, settings)
    batch = Collator(components.tokenizers, components.reference_size)([dataset[(i, i)] for i in range(2)])
    if projection == "plus":  # the resampler reads the encoder's penultimate hidden states
        config = AdapterConfig("plus", encoder.config.hidden_size, spec.cross_attention_dim, 4, text_weight=True,
                               resampler_dim=32, resampler_depth=1, resampler_heads=1)  # fmt: skip
    else:
        config = AdapterConfig("basic", spec.basic_image_encoder.projection_dim, spec.cross_attention_dim, 4,
                               text_weight=True)  # fmt: skip
    adapter = MIPAdapter.for_unet(components.unet, config).to(weight_dtype)
    for module in (components.unet, components.image_encoder, *components.text_encoders):
        module.to(weight_dtype)
    scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, prediction_type=prediction_type)
    frozen = FrozenModels(
        components.vae, TextConditioner(components.text_encoders, arch), components.image_encoder,
        scheduler, uses_hidden_states=config.uses_hidden_states, weight_dtype=weight_dtype,
    )  # fmt: skip
    if device is not None:
        for module in (adapter, components.vae, components.unet, components.image_encoder, *components.text_encoders):
            module.to(device)
        batch = batch.to(device)
    adapter.attach(components.unet)
    try:
        unet = AdapterUNet(components.unet, adapter, "official")
        if device == "meta":  # the routing reads its masks' values, which meta tensors do not have
            unet = lambda noisy, *args: torch.zeros_like(noisy)  # noqa: E731
        model = Capturing(unet)
        with torch.no_grad():
            loss = training_loss(model, frozen, batch, torch.Generator().manual_seed(7), **options)
    finally:
        adapter.detach()
    return loss, model, scheduler, batch, components.vae


def replayed_draws(vae, batch, scheduler, noise_offset: float | None):
    """latents, noise, timesteps drawn again from the same seed, in training_loss's order."""
    replay = torch.Generator().manual_seed(7)
    latents = encode_latents(vae, batch.pixel_values, replay)
    noise = torch.randn(latents.shape, generator=replay)
    if noise_offset is not None:
        offsets = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=replay)
        noise = noise + noise_offset * offsets
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=replay)
    return latents, noise, timesteps


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_v_prediction_loss_is_the_mse_against_the_velocity(tmp_path, arch):
    """Guards the v-prediction target: under ``prediction_type="v_prediction"`` the loss is the MSE of the
    prediction against ``get_velocity(latents, noise, t)`` = α_t·noise − σ_t·latents. Fails when the
    arguments are swapped (``get_velocity(noise, latents, t)``) or the epsilon target is used instead.
    The draws (latents, noise with an offset, timesteps) are replayed from the same generator seed."""
    loss, model, scheduler, batch, vae = captured_loss(tmp_path, arch, "v_prediction", noise_offset=0.1)
    latents, noise, timesteps = replayed_draws(vae, batch, scheduler, 0.1)
    assert torch.equal(model.timesteps, timesteps)
    torch.testing.assert_close(model.noisy, scheduler.add_noise(latents, noise, timesteps))
    alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    prediction = model.prediction.float()
    torch.testing.assert_close(loss, F.mse_loss(prediction, velocity))
    swapped = alpha.sqrt() * latents - (1 - alpha).sqrt() * noise
    for wrong in (swapped, noise):  # the test can tell the right target from these
        assert not torch.isclose(loss, F.mse_loss(prediction, wrong), rtol=1e-3)


def test_epsilon_loss_is_the_mse_against_the_noise_without_an_offset_by_default(tmp_path):
    """The default: epsilon prediction, no noise offset (no extra draw). Fails when the default offset
    is not 0, or when the target is not the noise."""
    loss, model, scheduler, batch, vae = captured_loss(tmp_path, "sd15", "epsilon")
    latents, noise, timesteps = replayed_draws(vae, batch, scheduler, None)
    assert torch.equal(model.timesteps, timesteps)
    torch.testing.assert_close(model.noisy, scheduler.add_noise(latents, noise, timesteps))
    torch.testing.assert_close(loss, F.mse_loss(model.prediction.float(), noise))


def test_the_unet_inputs_are_in_the_weight_dtype(tmp_path):
    """With the frozen models in bfloat16 and the VAE in float32 (as training runs them), the latents,
    noise, prompt embeddings and SDXL's added conditions reach the UNet in bfloat16 and the loss is
    the float32 MSE against the bfloat16 noise. Fails when the weight dtype is ignored (the float32
    latents then meet bfloat16 weights)."""
    bfloat16 = torch.bfloat16
    loss, model, scheduler, batch, vae = captured_loss(tmp_path, "sdxl", "epsilon", weight_dtype=bfloat16)
    assert next(vae.parameters()).dtype == torch.float32
    prompt_embeds, added = model.args[0], model.args[1]
    assert model.noisy.dtype == prompt_embeds.dtype == torch.bfloat16
    assert {value.dtype for value in added.values()} == {torch.bfloat16}
    latents, noise, timesteps = replayed_draws(vae, batch, scheduler, None)
    torch.testing.assert_close(
        model.noisy, scheduler.add_noise(latents.bfloat16(), noise.bfloat16(), timesteps), rtol=0, atol=0
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.mse_loss(model.prediction.float(), noise.bfloat16().float()))


def test_a_plus_adapter_is_fed_the_encoders_hidden_states(tmp_path):
    """A Plus adapter trains on the image encoder's penultimate hidden states [B, n, L, D] of the
    references (as its pipeline feeds it), not on the projected embeddings. Guards FrozenModels'
    ``uses_hidden_states`` not reaching the image encoding."""
    from mipadapter.training.step import encode_images

    loss, model, _, batch, _ = captured_loss(tmp_path, "sd15", "epsilon", projection="plus")
    features = model.args[2]
    assert features.ndim == 4  # [B, n, L, D]
    encoder, _ = TINY_SD15.basic_image_encoder.build()  # the same seeded weights as the run's
    torch.testing.assert_close(features, encode_images(encoder, batch.references, True))
    assert features.shape[-1] == encoder.config.hidden_size
    assert torch.isfinite(loss)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_every_tensor_of_a_step_is_made_where_the_batch_is(tmp_path, arch):
    """Guards training_loss's devices: the noise, its offset, the timesteps and SDXL's time ids are moved
    to the batch's device (the generator draws on the CPU). The meta device stands in for a GPU: a
    tensor left on the CPU meets meta tensors and the step fails or reaches the model on the CPU, where
    on one CPU nothing would show. The encoders run on meta; the UNet is a stand-in returning zeros
    (routing reads mask values, which meta tensors do not hold)."""
    loss, model, _, batch, _ = captured_loss(tmp_path, arch, "epsilon", device="meta", noise_offset=0.1)
    assert batch.pixel_values.device.type == "meta"
    assert loss.device.type == model.noisy.device.type == model.timesteps.device.type == "meta"
    if arch == "sdxl":
        assert {value.device.type for value in model.args[1].values()} == {"meta"}


@pytest.mark.parametrize(("n", "views"), [(2, None), (3, 1), (2, 3)])
def test_the_training_conditioning_gives_each_view_its_subject_and_share(n, views, monkeypatch):
    """Guards subject_conditioning (a padded batch → the processors' conditioning): each of a subject's
    views is its own condition owned by that subject with a 1/views share (one view by default); the
    latent size, rule and padding mask are passed on as given (a non-square size, a padded subject).
    Owner and share are made on the image tokens' device: meta stands in for a GPU, with the
    conditioning's own checks (which read owner's values, absent on meta) replaced by a record."""
    from types import SimpleNamespace

    from mipadapter.config import MergeRule
    from mipadapter.training import step
    from mipadapter.training.step import subject_conditioning

    b, m, c = 2, 3, 8
    k = views or 1
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -1] = False  # the second sample has one subject fewer
    names, name_mask = torch.randn(b, n, m, c), torch.ones(b, n, m, dtype=torch.bool)
    options = {} if views is None else {"views": views}
    tokens = torch.randn(b, n * k, 4, c, dtype=torch.float64)  # not the default dtype: scales follow it
    cond = subject_conditioning(tokens, mask, names, name_mask, "paper", False, (6, 10), **options)
    assert cond.owner.tolist() == [s for s in range(n) for _ in range(k)]
    assert torch.equal(cond.share, torch.full((n * k,), 1.0 / k, dtype=torch.float64))
    assert cond.scales.dtype == cond.share.dtype == torch.float64 and torch.equal(cond.scales, mask.double())
    assert cond.latent_size == (6, 10) and cond.rule is MergeRule.PAPER and cond.use_text_weight is False
    assert cond.present is mask and cond.image_tokens is tokens and cond.name_embeds is names
    monkeypatch.setattr(step, "SubjectConditioning", SimpleNamespace)
    on_meta = subject_conditioning(tokens.to("meta"), mask, names, name_mask, "paper", False, (6, 10), **options)
    assert on_meta.owner.device.type == on_meta.share.device.type == "meta"
    monkeypatch.undo()
    full = subject_conditioning(tokens, torch.ones(b, n, dtype=torch.bool), names, name_mask, "official", True, (8, 8), **options)
    assert full.present is None and full.use_text_weight is True  # nothing padded: no mask to apply
