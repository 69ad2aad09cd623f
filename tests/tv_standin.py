"""Stand-ins for the two torchvision calls the GLM video processors make (test references only).

torchvision cannot be imported in this environment (its wheels are CUDA builds),
so ``tv_resize_standin`` re-does, with plain torch calls, exactly what
``torchvision.transforms.v2.functional.resize(x, size, interpolation=BICUBIC,
antialias=True)`` does for a CPU uint8 tensor shaped (..., C, H, W).

Source read: pytorch/vision, ``torchvision/transforms/v2/functional/_geometry.py``
at commit 00bf6d49b90f17a6be5495dc70ba6929524ed1fc (main, torchvision 0.2x era;
the same code is present at d78b462ff3dbe031db007bad5510290b0bf8cfe3):

* ``resize()``: ``kernel = _get_kernel(resize, type(inpt))`` -> for a plain
  ``torch.Tensor`` / ``tv_tensors.Image`` this is ``resize_image``; for
  ``tv_tensors.Video`` it is ``resize_video``, which just calls ``resize_image``.
* ``_do_native_uint8_resize_on_cpu(interpolation)``: for BICUBIC it returns True
  unconditionally (only BILINEAR depends on the CPU capability), so uint8 is in
  ``acceptable_dtypes`` on CPU and **no float round trip happens**: torch's
  uint8 kernel is called directly.
* ``resize_image()``:
    - ``antialias = False if antialias is None else antialias``;
      ``align_corners = False`` for BILINEAR/BICUBIC.
    - ``new_height, new_width = _compute_resized_output_size((H, W), size, max_size)``
      (for a 2-element size this is just ``[size[0], size[1]]``).
    - ``if (new_height, new_width) == (old_height, old_width): return image``
      -> the input tensor itself is returned untouched (same object, no copy).
    - ``elif numel > 0``: ``image = image.reshape(-1, C, H, W)`` (a view when
      possible -- memory format is *not* changed: no ``.contiguous()`` and no
      explicit ``channels_last`` conversion);
      if the 4-D tensor is channels_last-contiguous, has batch 1 and
      ``numel != strides[0]``, it is re-strided with ``as_strided`` so that
      stride[0] == numel (pytorch issue 68430 work-around);
      ``need_cast`` is False for uint8 + BICUBIC on CPU;
      ``image = interpolate(image, size=[new_h, new_w], mode="bicubic",
      align_corners=False, antialias=True)``;
      the clamp/round/cast branch is only taken when ``need_cast`` (not here).
    - ``return image.reshape(shape[:-3] + (C, new_h, new_w))``.
    - For ``numel == 0`` the input is only reshaped to the new size (which
      fails unless it is empty-compatible), mirrored here.

``torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)`` with
``size`` given calls ``torch._C._nn._upsample_bicubic2d_aa(input, output_size,
align_corners, scale_factors=None)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch.nn.functional import interpolate


def _compute_resized_output_size(image_size, size, max_size=None):
    # torchvision.transforms.functional._compute_resized_output_size (v2 calls it
    # with allow_size_none=True); only the branches relevant here are mirrored.
    h, w = image_size
    if isinstance(size, int):
        size = [size]
    short, long = (w, h) if w <= h else (h, w)
    if size is None:
        if not isinstance(max_size, int):
            raise ValueError("max_size must be an integer when size is None")
        new_short, new_long = int(max_size * short / long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    elif len(size) == 1:
        requested_new_short = size[0]
        new_short, new_long = requested_new_short, int(requested_new_short * long / short)
        if max_size is not None:
            if max_size <= requested_new_short:
                raise ValueError("max_size must be strictly greater than the requested size")
            if new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_w, new_h = size[1], size[0]
    return [new_h, new_w]


def tv_resize_standin(x: torch.Tensor, size: Union[Sequence[int], int], max_size=None) -> torch.Tensor:
    """Mirror of torchvision v2 ``resize_image`` for uint8 CPU BICUBIC antialias=True.

    ``x``: uint8 CPU tensor (..., C, H, W), any strides.  ``size``: [out_h, out_w].
    """
    if x.dtype != torch.uint8 or x.device.type != "cpu":
        raise TypeError("stand-in only covers uint8 CPU tensors")
    image = x
    shape = image.shape
    numel = image.numel()
    num_channels, old_height, old_width = shape[-3:]
    new_height, new_width = _compute_resized_output_size((old_height, old_width), size, max_size)

    if (new_height, new_width) == (old_height, old_width):
        return image  # same object, untouched
    elif numel > 0:
        image = image.reshape(-1, num_channels, old_height, old_width)
        strides = image.stride()
        if image.is_contiguous(memory_format=torch.channels_last) and image.shape[0] == 1 and numel != strides[0]:
            new_strides = list(strides)
            new_strides[0] = numel
            image = image.as_strided((1, num_channels, old_height, old_width), new_strides)
        # need_cast is False: uint8 is an acceptable dtype for BICUBIC on CPU.
        image = interpolate(
            image,
            size=[new_height, new_width],
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
    return image.reshape(shape[:-3] + (num_channels, new_height, new_width))


def normalize(image: torch.Tensor, mean: Union[Sequence[float], torch.Tensor],
              std: Union[Sequence[float], torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """Mirror of torchvision v2 ``normalize_image`` (float tensors): ``(image - mean) / std`` per channel,
    mean and std as tensors of the image's dtype viewed ``(-1, 1, 1)``, ``sub_``/``div_`` when in place."""
    if not image.is_floating_point():
        raise TypeError(f"input tensor should be a float tensor, got {image.dtype}")
    dtype, device = image.dtype, image.device
    mean = torch.as_tensor(mean, dtype=dtype, device=device)
    std = torch.as_tensor(std, dtype=dtype, device=device)
    if (std == 0).any():
        raise ValueError("std evaluated to zero, leading to division by zero")
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    if inplace:
        image = image.sub_(mean)
    else:
        image = image.sub(mean)
    return image.div_(std)
