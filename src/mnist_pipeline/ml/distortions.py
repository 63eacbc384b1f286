"""What real inputs do to a digit, on whole batches: affine moves, elastic warps, thinner and thicker strokes, blur,
noise, low contrast, what pages add (lines across the digit, outlines, specks, motion blur, fog, uneven light),
and the rendering of a digit as a photo of it.

Every function takes and returns (N, 1, 28, 28) float pixels in [0, 1] (light digit on black) on any device, and
draws its randomness from the ``generator`` it is given, so a seed fixes the result. They serve two masters: the
robustness report (`robustness`), at fixed strengths, and the training's augmentation (`augment`), at strengths
drawn per digit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def affine(
    x: torch.Tensor,
    degrees: torch.Tensor | float = 0.0,
    scale: torch.Tensor | float = 1.0,
    shift: torch.Tensor | None = None,
    shear: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Rotate by ``degrees`` (counter-clockwise), scale about the centre, shear along x by ``shear`` degrees and
    translate by ``shift`` pixels ((N, 2): x, y); each a number or one value per digit. Bilinear, black outside."""
    n, device = len(x), x.device

    def per_digit(value) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.float32, device=device).expand(n)

    angle, zoom, slant = (per_digit(v) * k for v, k in ((degrees, math.pi / 180), (scale, 1), (shear, math.pi / 180)))
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(slant)
    # affine_grid maps output coordinates to input ones: the inverse of the wanted move, in [-1, 1] units.
    forward = torch.zeros(n, 3, 3, device=device)
    forward[:, 0, 0], forward[:, 0, 1] = zoom * cos, zoom * (cos * tan - sin)
    forward[:, 1, 0], forward[:, 1, 1] = zoom * sin, zoom * (sin * tan + cos)
    forward[:, 2, 2] = 1
    if shift is not None:
        forward[:, :2, 2] = shift.to(device=device, dtype=torch.float32) * (2 / x.shape[-1])
    theta = torch.linalg.inv(forward)[:, :2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (separable), any number of channels."""
    kernel = _gaussian_kernel(sigma, x.device)
    c, r = x.shape[1], len(kernel) // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def elastic(x: torch.Tensor, alpha: torch.Tensor | float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Elastic distortion (Simard et al., 2003): every pixel moved by a random field smoothed by a Gaussian of
    ``sigma`` pixels, scaled so that its largest moves are about ``alpha`` pixels."""
    n, _, h, w = x.shape
    return warp(x, torch.rand(n, 2, h, w, generator=generator, device=generator.device), alpha, sigma)


def warp(x: torch.Tensor, field: torch.Tensor, alpha: torch.Tensor | float, sigma: float) -> torch.Tensor:
    """`elastic` with its random field given: (N, 2, H, W) uniform in [0, 1)."""
    n, _, h, w = x.shape
    field = blur(field.to(x.device) * 2 - 1, sigma)
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    strength = torch.as_tensor(alpha, dtype=torch.float32, device=x.device).expand(n).view(n, 1, 1, 1)
    identity = F.affine_grid(torch.eye(2, 3, device=x.device).expand(n, 2, 3), list(x.shape), align_corners=False)
    moves = (field * strength * (2 / w)).permute(0, 2, 3, 1)  # pixels -> grid units, (N, H, W, 2)
    return F.grid_sample(x, identity + moves, mode="bilinear", padding_mode="zeros", align_corners=False)


def _grow(x: torch.Tensor, size: int) -> torch.Tensor:
    """Grey dilation with a size x size window (2: strokes a pixel wider, 3: two pixels), as the maximum of shifted
    copies: a few element-wise maxima, much quicker on a CPU than a stride-1 max-pooling."""
    padded = F.pad(x, (0, 1, 0, 1)) if size == 2 else F.pad(x, (1, 1, 1, 1))
    w, h = x.shape[-1], x.shape[-2]
    across = padded[..., :, 0:w]
    for k in range(1, size):
        across = torch.maximum(across, padded[..., :, k : k + w])
    grown = across[..., 0:h, :]
    for k in range(1, size):
        grown = torch.maximum(grown, across[..., k : k + h, :])
    return grown


def stroke(x: torch.Tensor, change: torch.Tensor | int) -> torch.Tensor:
    """Thicker (``change`` > 0, a grey dilation) or thinner (< 0, an erosion) strokes: 1 by a pixel, 2 by two;
    one value for all digits or one per digit (-2..2)."""
    if isinstance(change, int):
        if change == 0:
            return x
        size = abs(change) + 1
        return _grow(x, size) if change > 0 else -_grow(-x, size)
    out = x.clone()
    change = change.to(x.device)
    for amount in (-2, -1, 1, 2):  # each amount on its own digits only
        chosen = (change == amount).nonzero().squeeze(1)
        if len(chosen):
            out[chosen] = stroke(x[chosen], amount)
    return out


def noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of standard deviation ``sigma`` (in [0, 1] pixel units), clipped to [0, 1]."""
    return (x + sigma * torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)).clamp(0, 1)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Low contrast: the pixels squeezed into a band of width ``factor`` around mid-grey."""
    return 0.5 + (x - 0.5) * factor


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator, device=generator.device).float() * 2 - 1


# --- what pages add: lines across the digit, outlines, specks, motion, fog, uneven light ----------------------------


def _uniform(n: int, generator: torch.Generator, low, high) -> torch.Tensor:
    """One value per digit, uniform in [low, high); ``low`` and ``high`` numbers or (N,) tensors."""
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _coordinates(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's (x, y) from the frame's centre, as (1, 1, 1, 28) and (1, 1, 28, 1)."""
    t = torch.arange(28, dtype=torch.float32, device=device) - 13.5
    return t.view(1, 1, 1, 28), t.view(1, 1, 28, 1)


def line(
    x: torch.Tensor,
    width,
    generator: torch.Generator,
    brightness=1.0,
    max_angle: float = 90.0,
    wave=0.0,
    dash: float = 0.0,
) -> torch.Tensor:
    """A line across each digit, as ink: ``width`` pixels wide (a number, or one per digit), at an angle within
    ``max_angle`` degrees of horizontal, through the digit's middle; ``wave`` pixels of sine wave along it (a
    scribble), dashes of ``dash`` pixels with gaps as long (a dotted line), ``brightness`` its ink. Every amount
    drawn per digit from ``generator``."""
    n, device = len(x), x.device

    def per_digit(value) -> torch.Tensor:
        return torch.as_tensor(value, dtype=torch.float32, device=device).expand(n).reshape(n, 1, 1, 1)

    angle = _uniform(n, generator, -max_angle, max_angle).to(device).view(n, 1, 1, 1) * (math.pi / 180)
    offset = _uniform(n, generator, -5.0, 5.0).to(device).view(n, 1, 1, 1)  # through the digit, not beside it
    phase = _uniform(n, generator, 0.0, 2 * math.pi).to(device).view(n, 1, 1, 1)
    cycle = _uniform(n, generator, 8.0, 16.0).to(device).view(n, 1, 1, 1)  # pixels per wave of a scribble
    px, py = _coordinates(device)
    along = px * torch.cos(angle) + py * torch.sin(angle)
    across = -px * torch.sin(angle) + py * torch.cos(angle) - offset
    across = across - per_digit(wave) * torch.sin(2 * math.pi * along / cycle + phase)
    ink = (per_digit(width) / 2 + 0.5 - across.abs()).clamp(0, 1)  # anti-aliased edges
    if dash:
        ink = ink * (torch.remainder(along + phase, 2 * dash) < dash)
    return torch.maximum(x, per_digit(brightness) * ink)


def outline(x: torch.Tensor, width: int) -> torch.Tensor:
    """Only the strokes' edges, ``width`` pixels of them: an edge image of the digit."""
    return (x - stroke(x, -width)).clamp(0, 1)


def specks(x: torch.Tensor, fraction, generator: torch.Generator) -> torch.Tensor:
    """Impulse noise: ``fraction`` of the pixels (a number, or one per digit) set to full ink or to none, half each."""
    n = len(x)
    u = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
    f = torch.as_tensor(fraction, dtype=torch.float32, device=x.device).expand(n).reshape(n, 1, 1, 1)
    return torch.where(u < f / 2, 1.0, torch.where(u > 1 - f / 2, 0.0, x))


def motion_blur(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """The camera or page moving while the picture was taken: the mean of the digit shifted along a line of
    ``length`` pixels in a direction drawn per digit."""
    n = len(x)
    angle = _uniform(n, generator, 0.0, math.pi).to(x.device)
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    steps = torch.linspace(-(length - 1) / 2, (length - 1) / 2, length).tolist()
    return sum(affine(x, shift=direction * step) for step in steps) / length


def _smooth_field(n: int, generator: torch.Generator, device, cells: int = 4) -> torch.Tensor:
    """A smooth random field in [0, 1] over the frame, (N, 1, 28, 28): blotches about 28/cells pixels across."""
    coarse = torch.rand(n, 1, cells, cells, generator=generator, device=generator.device).to(device)
    field = F.interpolate(coarse, size=(28, 28), mode="bicubic", align_corners=False)
    low, high = field.amin(dim=(2, 3), keepdim=True), field.amax(dim=(2, 3), keepdim=True)
    return (field - low) / (high - low).clamp_min(1e-6)


def fog(x: torch.Tensor, density, generator: torch.Generator) -> torch.Tensor:
    """Fog, or a smudge: a grey haze of up to ``density`` (a number, or one per digit) over uneven patches,
    raising the background and fading the ink beneath it."""
    n = len(x)
    haze = torch.as_tensor(density, dtype=torch.float32, device=x.device).expand(n).reshape(n, 1, 1, 1)
    haze = haze * _smooth_field(n, generator, x.device)
    return x * (1 - haze) + 0.5 * haze


def uneven_light(x: torch.Tensor, strength, generator: torch.Generator) -> torch.Tensor:
    """Light falling unevenly across the page: towards one side (drawn per digit) the ink fades and the paper
    greys, by up to ``strength`` (a number, or one per digit)."""
    n = len(x)
    angle = _uniform(n, generator, 0.0, 2 * math.pi).to(x.device).view(n, 1, 1, 1)
    px, py = _coordinates(x.device)
    ramp = ((px * torch.cos(angle) + py * torch.sin(angle)) / 19.1 + 1) / 2  # 0..1 across the frame
    amount = torch.as_tensor(strength, dtype=torch.float32, device=x.device).expand(n).reshape(n, 1, 1, 1) * ramp
    return x * (1 - amount) + 0.4 * amount


# --- a photo of a digit -------------------------------------------------------------------------------------------

PHOTO_SIZE = 96  # pixels of the rendered photo: a digit photographed fills about a hundred pixels


def render_photos(x: torch.Tensor, generator: torch.Generator, quality: int = 70) -> list[np.ndarray]:
    """Each digit as a phone photo of it would be: dark ink on a light, unevenly lit background (a level, a
    gradient in a random direction, soft blotches), sensor noise, JPEG-compressed. Returns 0-255 greyscale arrays
    of PHOTO_SIZE pixels, as `predict` reads them from files."""
    import io

    from PIL import Image

    n, size = len(x), PHOTO_SIZE
    gen = generator.device

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=gen).cpu()

    ink = F.interpolate(x.cpu(), size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    level = 0.55 + 0.35 * uniform(n, 1, 1, 1)  # paper from grey to white
    direction = uniform(n) * 2 * math.pi
    ramp = torch.linspace(-1, 1, size)
    gradient = torch.cos(direction).view(n, 1, 1, 1) * ramp.view(1, 1, 1, -1) + torch.sin(direction).view(
        n, 1, 1, 1
    ) * ramp.view(1, 1, -1, 1)
    blotches = blur(uniform(n, 1, size // 8, size // 8) * 2 - 1, 1.0)
    blotches = F.interpolate(blotches, size=(size, size), mode="bilinear", align_corners=False)
    paper = level + 0.15 * uniform(n, 1, 1, 1) * gradient + 0.08 * blotches
    darkness = 0.6 + 0.3 * uniform(n, 1, 1, 1)  # pencil to marker
    photo = paper * (1 - darkness * ink) + 0.03 * torch.randn(n, 1, size, size, generator=generator, device=gen).cpu()
    pixels = (photo.clamp(0, 1) * 255).round().to(torch.uint8).numpy()[:, 0]
    rendered = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        rendered.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L")))
    return rendered
