"""The vision adapter: a small encoder and an MLP projector into a frozen chat model's embedding space.

    image (any size) --preprocess--> pixels [3, S, S] in [-1, 1]
    VisionEncoder: conv stem (S -> S/16) -> G*G patch tokens + learned positions -> transformer
                   layers -> a learned linear map from the G*G cells to N rows -> [N, encoder_dim]
    Projector:     Linear -> GELU -> Linear to the LM's hidden size -> [N, hidden_size]

The N output rows replace the N image placeholder positions of the prompt (prompt.py); the LM is
never changed. Files: `adapter.safetensors` (fp16) + `config.json` (everything needed to rebuild
the module and to preprocess and splice the same way: see DEFAULT_CONFIG).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT = "frontier-vision-v1"
WEIGHTS, CONFIG = "adapter.safetensors", "config.json"
DEFAULT_CONFIG: dict = {
    "format": FORMAT,
    "image_size": 96,  # S: images are resized (bicubic, aspect ratio not kept) to S x S RGB
    "mean": [0.5, 0.5, 0.5],  # pixels / 255, then (x - mean) / std: [-1, 1]
    "std": [0.5, 0.5, 0.5],
    "stem_channels": [32, 64, 128],  # then encoder_dim: S/2, S/4, S/8, S/16
    "encoder_dim": 192,
    "encoder_layers": 2,
    "encoder_heads": 4,
    "num_image_tokens": 16,  # N: rows per image spliced into the prompt
    "hidden_size": 576,  # the LM's hidden size (SmolLM2-135M)
}


def _conv(cin: int, cout: int, stride: int = 1, pool: bool = False) -> nn.Sequential:
    # BatchNorm and max-pooling: measured to learn these tasks several times faster than strided
    # convolutions with GroupNorm or no normalization.
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


def _pooling_matrix(grid: int, out: int) -> torch.Tensor:
    """[out*out, grid*grid]: adaptive average pooling of a grid x grid map to out x out, as a matrix."""
    eye = torch.eye(grid * grid).view(grid * grid, 1, grid, grid)
    return F.adaptive_avg_pool2d(eye, out).view(grid * grid, out * out).T.contiguous()


class VisionEncoder(nn.Module):
    """pixels [B, 3, S, S] -> [B, N, encoder_dim].

    A convolutional stem to an (S/16) x (S/16) grid of patch features, learned positions,
    transformer layers over the grid, then a learned linear map from the grid's cells to the N
    output rows (initialised as average pooling to sqrt(N) x sqrt(N): every row starts as a
    region of the picture) and a channel MLP."""

    def __init__(self, config: dict):
        super().__init__()
        c1, c2, c3 = config["stem_channels"]
        d = config["encoder_dim"]
        n = config["num_image_tokens"]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"num_image_tokens must be a square, got {n}")
        self.grid = config["image_size"] // 16
        self.stem = nn.Sequential(_conv(3, c1, stride=2), _conv(c1, c2, pool=True), _conv(c2, c3, pool=True),
                                  _conv(c3, d, pool=True))
        self.pos = nn.Parameter(torch.randn(self.grid * self.grid, d) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, config["encoder_heads"], 4 * d, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(config["encoder_layers"]))
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Parameter(_pooling_matrix(self.grid, side))  # [N, G*G]
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.out_norm = nn.LayerNorm(d)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [B, 3, S, S]
        x = self.stem(pixels)  # [B, d, G, G]
        x = x.flatten(2).transpose(1, 2) + self.pos  # [B, G*G, d]
        for layer in self.layers:
            x = layer(x)
        x = self.mix @ self.norm(x)  # [B, N, d]
        x = x + self.mlp(x)
        return self.out_norm(x)  # [B, N, d]


class Projector(nn.Module):
    """[B, N, encoder_dim] -> [B, N, hidden_size] (LLaVA-1.5's two-layer GELU MLP)."""

    def __init__(self, config: dict):
        super().__init__()
        d, h = config["encoder_dim"], config["hidden_size"]
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionAdapter(nn.Module):
    """Encoder + projector: `forward(pixels [B, 3, S, S]) -> [B, N, hidden_size]`."""

    def __init__(self, config: dict | None = None, **overrides):
        super().__init__()
        self.config = {**DEFAULT_CONFIG, **(config or {}), **overrides}
        if self.config["image_size"] % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.config['image_size']}")
        self.encoder = VisionEncoder(self.config)
        self.projector = Projector(self.config)
        self.register_buffer("mean", torch.tensor(self.config["mean"]).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.config["std"]).view(3, 1, 1), persistent=False)

    @property
    def num_image_tokens(self) -> int:
        return self.config["num_image_tokens"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image (any mode, any size) -> normalized pixels [3, S, S] (float32)."""
        return normalize(to_uint8(image, self.image_size), self.mean, self.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [B, 3, S, S] -> [B, N, hidden_size]
        return self.projector(self.encoder(pixels))

    def embed_images(self, images) -> torch.Tensor:
        """PIL images -> [len(images), N, hidden_size], in inference mode, in the adapter's dtype."""
        pixels = torch.stack([self.preprocess(im) for im in images])
        with torch.inference_mode():
            return self(pixels.to(next(self.parameters()).dtype))


def to_uint8(image, size: int) -> torch.Tensor:
    """A PIL image -> [3, size, size] uint8 (RGB; alpha composited on white; bicubic resize)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 (pixels / 255 - mean) / std."""
    return (pixels.float() / 255.0 - mean) / std


def save_adapter(adapter: VisionAdapter, out_dir: Path, metadata: dict | None = None) -> Path:
    """out_dir/adapter.safetensors (fp16) + out_dir/config.json (config plus `metadata`)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: (t.detach().to(torch.float16) if t.is_floating_point() else t.detach()).contiguous()
               for n, t in adapter.state_dict().items()}  # BatchNorm's step counter stays an integer
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": FORMAT})
    (out_dir / CONFIG).write_text(json.dumps({**adapter.config, **(metadata or {})}, indent=2) + "\n")
    return out_dir


def load_adapter(path: Path, dtype: torch.dtype = torch.float32) -> VisionAdapter:
    """The adapter saved in `path` (a directory), in eval mode, as `dtype`. Raises ValueError when
    the files are not a frontier vision adapter or do not match their config."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
    adapter = VisionAdapter({k: v for k, v in config.items() if k in DEFAULT_CONFIG})
    adapter.config = config  # keep the metadata (LM, placeholder, training run) for callers
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = adapter.load_state_dict(
        {n: t.float() if t.is_floating_point() else t for n, t in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS} does not match its config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return adapter.to(dtype).eval()


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
