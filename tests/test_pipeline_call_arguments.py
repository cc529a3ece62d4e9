"""ClassConditionalPipeline's diffusers-common ``__call__`` arguments, checked against diffusers' own semantics
(its callback classes, StableDiffusionPipeline's checks and prompt repetition), and hostile argument values."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback
from test_pipeline_class_conditional import NAMES, make_pipe, sample, tiny_classifier, tiny_unet

from hfx.models.vae import HfxVAEConfig, HfxVAEModel
from hfx.pipelines import ClassConditionalPipeline, LatentDiffusionPipeline


def unet_calls(pipe) -> list[dict]:
    """Record the batch size and class labels of every UNet call."""
    calls = []
    pipe.unet.register_forward_hook(
        lambda module, args, kwargs, output: calls.append({"batch": args[0].shape[0],
                                                           "labels": kwargs["class_labels"].tolist()}),
        with_kwargs=True)
    return calls


class Recorder(PipelineCallback):
    """A diffusers PipelineCallback that records what it is given and changes nothing."""

    tensor_inputs = ["class_labels"]

    def __init__(self):
        super().__init__()
        self.seen = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen.append((step_index, int(timestep), {k: v.clone() for k, v in callback_kwargs.items()}))
        return callback_kwargs


class SwitchClass(PipelineCallback):
    """After step 0, ask for class 7 instead: the class-label analogue of swapping prompt embeddings."""

    tensor_inputs = ["latents", "class_labels"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == 0:
            callback_kwargs["class_labels"] = torch.full_like(callback_kwargs["class_labels"], 7)
        return callback_kwargs


# ---------------------------------------------------------------------------------- num_images_per_prompt
def test_num_images_per_prompt_repeats_each_label_in_place_as_diffusers_repeats_prompts():
    pipe = make_pipe()
    recorder = Recorder()
    images = sample(pipe, ["digit-3", 7], guidance_scale=2.0, num_images_per_prompt=3, callback_on_step_end=recorder)
    # StableDiffusionPipeline.encode_prompt: `embeds.repeat(1, n, 1).view(batch * n, ...)`, here on the label ids
    expected_labels = torch.tensor([3, 7])[:, None].repeat(1, 3).view(-1)
    assert recorder.seen[0][2]["class_labels"].tolist() == expected_labels.tolist() == [3, 3, 3, 7, 7, 7]
    assert images.shape == (6, 1, 8, 8)
    assert torch.equal(images, sample(pipe, [3, 3, 3, 7, 7, 7], guidance_scale=2.0))
    assert not torch.equal(images[0], images[1])  # different noise for each image of a label

    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    by_list = pipe([1, 2], num_images_per_prompt=2, num_inference_steps=3, generator=generators, output_type="pt").images
    one_by_one = [pipe([label], num_inference_steps=3, generator=torch.Generator().manual_seed(i), output_type="pt").images
                  for i, label in enumerate([1, 1, 2, 2])]
    torch.testing.assert_close(by_list, torch.cat(one_by_one), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"got 3 generators for 2 class labels x num_images_per_prompt=2 = 4 images"):
        pipe([1, 2], num_images_per_prompt=2, num_inference_steps=2, generator=generators[:3])
    with pytest.raises(ValueError, match=r"latents have shape \(2, 1, 8, 8\), expected \(4, 1, 8, 8\)"):
        pipe([1, 2], num_images_per_prompt=2, num_inference_steps=2, latents=torch.zeros(2, 1, 8, 8))


# ---------------------------------------------------------------------------------- callback_on_step_end
def test_callback_gets_diffusers_signature_and_its_tensors_replace_the_pipelines():
    pipe = make_pipe()
    seen = []

    def callback(p, step_index, timestep, callback_kwargs):
        seen.append((p, step_index, timestep, sorted(callback_kwargs)))
        return callback_kwargs

    plain = sample(pipe, [1, 2], steps=4)
    assert torch.equal(sample(pipe, [1, 2], steps=4, callback_on_step_end=callback), plain)  # returned unchanged
    assert [s[1] for s in seen] == [0, 1, 2, 3]
    assert all(s[0] is pipe and s[3] == ["latents"] for s in seen)
    assert torch.equal(torch.stack([s[2] for s in seen]), pipe.scheduler.timesteps)

    def zero_at_the_end(p, step_index, timestep, callback_kwargs):
        if step_index == p.num_timesteps - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}  # nothing returned: the pipeline keeps its own tensors

    replaced = sample(pipe, [1, 2], steps=4, callback_on_step_end=zero_at_the_end)
    assert torch.equal(replaced, torch.full_like(replaced, 0.5))  # x_0 = 0 decodes to mid-grey

    with pytest.raises(ValueError, match="callback_on_step_end must return a dict"):
        sample(pipe, [1], steps=2, callback_on_step_end=lambda *args: None)


def test_pipeline_callback_objects_bring_their_own_tensor_inputs_and_chain():
    pipe = make_pipe()
    calls = unet_calls(pipe)
    recorder = Recorder()
    switched = sample(pipe, [3], steps=3, guidance_scale=1.0, callback_on_step_end_tensor_inputs=["latents"],
                      callback_on_step_end=MultiPipelineCallbacks([SwitchClass(), recorder]))
    # The Recorder's own tensor_inputs, not the list passed; it sees what SwitchClass returned, like diffusers.
    assert [sorted(kwargs) for _, _, kwargs in recorder.seen] == [["class_labels", "latents"]] * 3
    assert [kwargs["class_labels"].tolist() for _, _, kwargs in recorder.seen] == [[7]] * 3
    assert [call["labels"] for call in calls] == [[3], [7], [7]]  # the UNet uses the replaced labels
    assert not torch.equal(switched, sample(pipe, [3], steps=3, guidance_scale=1.0))


def test_tensor_inputs_outside_callback_tensor_inputs_raise_diffusers_own_error():
    pipe = make_pipe()
    # The message StableDiffusionPipeline.check_inputs itself gives for a pipeline with these tensor inputs.
    fake_sd = types.SimpleNamespace(_callback_tensor_inputs=pipe._callback_tensor_inputs)
    with pytest.raises(ValueError) as diffusers_error:
        StableDiffusionPipeline.check_inputs(fake_sd, "a prompt", 8, 8, None,
                                             callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    with pytest.raises(ValueError) as ours:
        sample(pipe, [1], steps=2, callback_on_step_end=lambda *a: {},
               callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    assert str(ours.value) == str(diffusers_error.value)
    assert "but found ['noise_pred']" in str(ours.value)
    # diffusers' own CFG cutoff callback asks for prompt embeddings, which a class-conditional pipeline has not
    with pytest.raises(ValueError, match=r"has to be in \['latents', 'class_labels'\], but found \['prompt_embeds'\]"):
        sample(pipe, [1], steps=2, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))


def test_interrupt_skips_the_remaining_steps_and_decodes_the_current_sample():
    pipe = make_pipe()
    calls = unet_calls(pipe)
    at_interrupt = []

    def stop_after_step_1(p, step_index, timestep, callback_kwargs):
        if step_index == 1:
            p._interrupt = True  # how diffusers' docs interrupt a pipeline
            at_interrupt.append(callback_kwargs["latents"].clone())
        return callback_kwargs

    images = sample(pipe, [4, 5], steps=5, guidance_scale=2.0, callback_on_step_end=stop_after_step_1)
    assert pipe.interrupt and len(calls) == 2 and len(at_interrupt) == 1  # steps 2..4 skipped, callback too
    assert torch.equal(images, (at_interrupt[0] / 2 + 0.5).clamp(0, 1))
    calls.clear()
    sample(pipe, [4, 5], steps=5)  # the next call starts uninterrupted
    assert not pipe.interrupt and len(calls) == 5


@pytest.mark.parametrize("guidance_scale, cfg", [(0.0, False), (1.0, False), (0.5, True), (3.0, True)])
def test_call_state_properties_and_guidance_changed_by_a_callback(guidance_scale, cfg):
    pipe = make_pipe(scheduler=DDPMScheduler(num_train_timesteps=100), classifier=tiny_classifier())
    calls = unet_calls(pipe)

    def conditional_after_step_0(p, step_index, timestep, callback_kwargs):  # as SDCFGCutoffCallback does
        p._guidance_scale = 1.0
        return callback_kwargs

    sample(pipe, [1, 2], steps=3, guidance_scale=guidance_scale, guidance_rescale=0.3, classifier_scale=0.5,
           callback_on_step_end=conditional_after_step_0)
    assert (pipe.guidance_rescale, pipe.classifier_scale, pipe.num_timesteps) == (0.3, 0.5, 3)
    assert pipe.guidance_scale == 1.0 and not pipe.do_classifier_free_guidance
    assert [call["batch"] for call in calls] == [4 if cfg else 2, 2, 2]  # one batched CFG call, then conditional only
    sample(pipe, [1], steps=2, guidance_scale=guidance_scale)
    assert pipe.guidance_scale == guidance_scale and pipe.do_classifier_free_guidance is cfg


# ---------------------------------------------------------------------------------- hostile values
NAN, INF = float("nan"), float("inf")
BAD_CALL_ARGUMENTS = [
    *[("guidance_scale", v, r"guidance_scale must be >= 0 \(a finite number") for v in (NAN, INF, -INF, -1.0, True, "2",
                                                                                      torch.tensor(2.0))],
    *[("classifier_scale", v, r"classifier_scale must be >= 0 \(a finite number\)") for v in (NAN, INF, -1e-3, True, "1")],
    *[("guidance_rescale", v, r"guidance_rescale must be in \[0, 1\]") for v in (NAN, INF, -0.1, 1.5, True, "0.5")],
    *[("dynamic_thresholding_ratio", v, r"dynamic_thresholding_ratio must be in \(0, 1\] or None")
      for v in (NAN, INF, 0.0, -0.5, 1.5, True)],
    *[("num_images_per_prompt", v, "num_images_per_prompt must be an integer >= 1") for v in (0, -1, True, 2.5, "2", None)],
    *[("num_inference_steps", v, "num_inference_steps must be an integer >= 1") for v in (NAN, 0, -3, True, "5", None)],
    *[("output_type", v, "output_type must be 'pil', 'np' or 'pt'") for v in (None, 3, "latent", ["pt"])],
    *[("return_dict", v, "return_dict must be True or False") for v in ("no", 1, None)],
    *[("generator", v, "generator must be a torch.Generator, a list of one per image, or None") for v in (0, "seed")],
    ("generator", [torch.Generator(), 1], "generator must hold torch.Generator objects"),
    ("latents", torch.full((2, 1, 8, 8), NAN), "latents contain NaN or infinite values"),
    ("latents", torch.full((2, 1, 8, 8), INF), "latents contain NaN or infinite values"),
    ("latents", torch.zeros(2, 1, 8, 8, dtype=torch.long), "latents must be a floating-point torch.Tensor"),
    ("latents", np.zeros((2, 1, 8, 8), np.float32), "latents must be a floating-point torch.Tensor"),
    *[("callback_on_step_end", v, "callback_on_step_end must be a function") for v in (3, "print")],
    ("callback_on_step_end_tensor_inputs", "latents", "must be a list of names from"),
    ("callback_on_step_end_tensor_inputs", None, "must be a list of names from"),
    *[("class_labels", v, "class_labels must be a class id, a class name, a list") for v in (None, {1: 2}, {3})],
    ("class_labels", True, "must be an int id or a class name, not bool"),
    ("class_labels", torch.tensor([1.0]), "class_labels must be integer ids"),
    ("class_labels", np.array([[1, 2]]), r"class_labels must be 0-d or 1-d, got shape \(1, 2\)"),
    ("class_labels", torch.tensor([True, False]), "must be an int id or a class name, not bool"),
]


@pytest.mark.parametrize("name, value, message", BAD_CALL_ARGUMENTS,
                         ids=[f"{name}={value!r}"[:40] for name, value, _ in BAD_CALL_ARGUMENTS])
def test_hostile_call_arguments_raise_value_errors_naming_the_argument(name, value, message):
    pipe = make_pipe(classifier=tiny_classifier())
    calls = unet_calls(pipe)
    kwargs = {"class_labels": [1, 2], "num_inference_steps": 2, name: value}
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
    assert calls == []  # refused before any sampling


def test_infinite_default_guidance_in_a_saved_pipeline_is_refused_at_load(tmp_path):
    make_pipe().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "default_guidance_scale": NAN}))  # as hfx 0.1 could
    with pytest.raises(ValueError, match=r"default_guidance_scale must be a finite number >= 0 .*got nan"):
        ClassConditionalPipeline.from_pretrained(tmp_path)


UNCONDITIONAL_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
BAD_CONSTRUCTOR_ARGUMENTS = [
    *[({"default_guidance_scale": v}, r"default_guidance_scale must be a finite number >= 0")
      for v in (NAN, INF, -0.5, True, "2", None)],
    ({"unet": None}, "unet must be a UNet2DModel with num_class_embeds = num_classes \\+ 1 .*got a NoneType"),
    ({"unet": "unet"}, "unet must be a UNet2DModel with num_class_embeds"),
    ({"unet": UNet2DModel(**UNCONDITIONAL_UNET)}, "num_class_embeds=None"),
    ({"unet": UNet2DModel(**UNCONDITIONAL_UNET, num_class_embeds=1)}, "num_class_embeds=1"),
    *[({"scheduler": v}, "scheduler must be a diffusers scheduler") for v in (None, "ddpm", DDPMScheduler)],
    *[({"classifier": v}, "classifier must be a NoisyClassifier") for v in ("classifier", torch.nn.Linear(2, 2))],
    ({"class_names": "0123456789"}, "class_names must be a list of strings"),
    ({"class_names": 10}, "class_names must be a list of strings"),
    ({"class_names": list(range(10))}, "class_names must be non-empty strings, got \\[0, 1"),
    ({"class_names": [*NAMES[:9], ""]}, "class_names must be non-empty strings, got \\[''\\]"),
    ({"class_names": {"0": "a", "x": "b"}}, "class_names as a mapping needs the ids 0..1 as keys"),
    ({"class_names": [*NAMES[:9], NAMES[0]]}, "class_names must be unique"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONSTRUCTOR_ARGUMENTS,
                         ids=[repr(kwargs)[:40] for kwargs, _ in BAD_CONSTRUCTOR_ARGUMENTS])
def test_hostile_constructor_arguments_raise_value_errors_naming_the_argument(kwargs, message):
    kwargs = {"unet": tiny_unet(), "scheduler": DDPMScheduler(num_train_timesteps=100), **kwargs}
    with pytest.raises(ValueError, match=message):
        ClassConditionalPipeline(**kwargs)


def test_latent_pipeline_refuses_a_vae_it_cannot_decode_with():
    unet = UNet2DModel(**{**UNCONDITIONAL_UNET, "sample_size": 4, "in_channels": 2, "out_channels": 2},
                       num_class_embeds=11)
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    with pytest.raises(ValueError, match="vae must be an HfxVAEModel or a diffusers AutoencoderKL"):
        LatentDiffusionPipeline(None, unet, scheduler)
    for factor in (NAN, INF, 0.0, -1.0):
        vae = HfxVAEModel(HfxVAEConfig(image_size=8, block_out_channels=[8, 16], latent_channels=2, norm_num_groups=4,
                                       scaling_factor=factor))
        with pytest.raises(ValueError, match=r"the vae's config.scaling_factor must be a finite number > 0"):
            LatentDiffusionPipeline(vae, unet, scheduler)
