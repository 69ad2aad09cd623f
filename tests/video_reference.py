"""The transformers GLM video processors' own code, reached without torchvision.

torchvision cannot be installed beside the local CPU torch (its wheels are CUDA builds), and the
video processors need it only for ``tvF.resize`` and ``tvF.normalize``. Everything else here is
transformers' code, called as the processors call it:

- ``sample_frames`` of ``Glm4vVideoProcessor`` / ``Glm46VVideoProcessor`` (plain Python), bound to a
  stand-in ``self`` holding the class defaults it reads;
- ``smart_resize`` of each module, ``patchify`` (it never touches ``self``), the fused
  ``_fuse_mean_std_and_rescale_factor`` and the processors' ``replace_video_token``.

``glm46v``'s module imports ``torchvision.transforms.v2.functional`` at the top; it is imported once
with empty stand-in modules in ``sys.modules``, which are removed again at once (so nothing else
sees a torchvision). The resize and normalise stand-ins are in :mod:`tv_standin`.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch


@cache
def modules() -> dict[str, Any]:
    """The two video-processing modules and the two processing modules, by variant."""
    import transformers.models.glm4v.processing_glm4v as p4
    import transformers.models.glm4v.video_processing_glm4v as v4

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional")
    fake = {n: types.ModuleType(n) for n in names}
    fake["torchvision.transforms.v2"].functional = fake["torchvision.transforms.v2.functional"]  # type: ignore
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(fake)
    try:
        v46 = importlib.import_module("transformers.models.glm46v.video_processing_glm46v")
        p46 = importlib.import_module("transformers.models.glm46v.processing_glm46v")
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return {"glm4v": (v4, v4.Glm4vVideoProcessor, p4.Glm4vProcessor),
            "glm46v": (v46, v46.Glm46VVideoProcessor, p46.Glm46VProcessor)}


def defaults(variant: str) -> SimpleNamespace:
    """A stand-in ``self`` with the class attributes ``sample_frames`` reads."""
    cls = modules()[variant][1]
    return SimpleNamespace(fps=cls.fps, max_duration=cls.max_duration, temporal_patch_size=cls.temporal_patch_size,
                           merge_size=cls.merge_size)


def sample_frames(variant: str, total_frames: int, fps: float | None, duration: float | None,
                  sample_fps: float | None = None) -> np.ndarray:
    from transformers.video_utils import VideoMetadata

    cls = modules()[variant][1]
    metadata = VideoMetadata(total_num_frames=total_frames, fps=fps, duration=duration)
    return cls.sample_frames(defaults(variant), metadata, fps=sample_fps)


def smart_resize(variant: str, num_frames: int, height: int, width: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    module = modules()[variant][0]
    return module.smart_resize(num_frames=num_frames, height=height, width=width, temporal_factor=2, factor=28,
                               min_pixels=min_pixels, max_pixels=max_pixels)


def pixel_values(variant: str, resized: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``pixel_values_videos`` and ``video_grid_thw`` row of resized uint8 frames ``(1, T, C, H, W)``,
    through ``rescale_and_normalize``'s fused path and ``patchify``."""
    import tv_standin
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    fuse = TorchvisionBackend._fuse_mean_std_and_rescale_factor.__wrapped__
    mean, std, _ = fuse(None, do_normalize=True, image_mean=tuple(OPENAI_CLIP_MEAN),
                        image_std=tuple(OPENAI_CLIP_STD), do_rescale=True, rescale_factor=1 / 255.0,
                        device=resized.device)
    normalised = tv_standin.normalize(resized.to(torch.float32), mean, std, inplace=True)
    cls = modules()[variant][1]
    patches, gt, gh, gw = cls.patchify(None, normalised, patch_size=14, merge_size=2, temporal_patch_size=2)
    return patches[0], [gt, gh, gw]


def video_text(variant: str, grid: list[int], frames_indices: list[int], fps: float | None) -> str:
    """What the processor puts in place of ``<|video|>`` (``replace_video_token``)."""
    from transformers.video_utils import VideoMetadata

    proc_cls = modules()[variant][2]
    stand_in = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), image_token="<|image|>")
    stand_in.replace_frame_token_id = lambda ts, num_image_tokens=1: proc_cls.replace_frame_token_id(
        stand_in, ts, num_image_tokens=num_image_tokens)
    metadata = VideoMetadata(total_num_frames=max(frames_indices) + 1, fps=fps, frames_indices=list(frames_indices))
    inputs = {"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}
    return proc_cls.replace_video_token(stand_in, inputs, 0)
