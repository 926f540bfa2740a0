"""The VGGT aggregator (spatial-geometric encoder of JanusVLN), run causally over a frame stream.

Architecture and parameter names follow ``facebookresearch/vggt`` (``vggt/models/aggregator.py``,
``vggt/layers/{block,attention,rope,vision_transformer,patch_embed}.py``), so the ``aggregator.*``
entries of the ``facebook/VGGT-1B`` state dict (or the ``vggt.aggregator.*`` entries of a JanusVLN
checkpoint) load by name with ``load_state_dict(strict=True)``:

* ``patch_embed``: a DINOv2 ViT with registers (``dinov2_vitl14_reg``: conv patch embedding, cls +
  register tokens, bicubic-interpolated absolute position embedding, LayerNorm eps 1e-6, LayerScale);
  its normalized patch tokens start the aggregator.
* per frame: ``[camera token, 4 register tokens, patches]``; the first frame of a stream takes
  ``camera_token[:, 0]`` / ``register_token[:, 0]``, every later frame index 1.
* ``depth`` pairs of blocks, alternating *frame* attention (within a frame) and *global* attention
  (across frames); blocks use QK-norm (LayerNorm over the head dim), 2-D RoPE on (row+1, col+1)
  patch coordinates (special tokens at 0, frequency 100) and LayerScale.
* output ``i`` = ``cat(frame_block_i(x), global_block_i(x))`` (2C channels), as VGGT returns it.

Streaming (as StreamVGGT and JanusVLN's ``Aggregator.forward(..., use_cache=True)`` do): the global
attention of a new frame attends to the cached K/V of the earlier frames plus its own tokens, i.e.
a causal frame mask. :meth:`VGGTAggregator.step` keeps those K/V in a
:class:`~omnistream.memory.dual.FrameKV` (initial frames + recent window), so a step costs the same
at frame 500 as at frame 60. :meth:`VGGTAggregator.forward` is the non-streaming reference: all frames
at once, global attention with an explicit causal frame mask (``causal=True``) or none (VGGT proper).
Since RoPE positions do not depend on the frame index, a cached key can be stored after QK-norm and
RoPE (StreamVGGT caches it before; the result is the same).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VGGTConfig:
    """Sizes of the aggregator; the defaults are ``facebook/VGGT-1B``'s."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    rope_freq: float = 100.0
    init_values: float = 0.01
    # the DINOv2 patch embedding (dinov2_vitl14_reg); embed_dim is shared with the aggregator
    dino_depth: int = 24
    dino_heads: int = 16

    @classmethod
    def from_dict(cls, d: dict) -> VGGTConfig:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- layers (VGGT names)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RotaryPositionEmbedding2D(nn.Module):
    """VGGT's 2-D RoPE: the head dim is split in halves rotated by the row and the column position."""

    def __init__(self, frequency: float = 100.0):
        super().__init__()
        self.base_frequency = frequency
        self._cache: dict = {}

    def _cos_sin(self, dim: int, n: int, device, dtype):
        key = (dim, n, device, dtype)
        if key not in self._cache:
            inv_freq = 1.0 / (self.base_frequency ** (torch.arange(0, dim, 2, device=device).float() / dim))
            ang = torch.einsum("i,j->ij", torch.arange(n, device=device, dtype=inv_freq.dtype), inv_freq).to(dtype)
            ang = torch.cat((ang, ang), dim=-1)
            self._cache[key] = (ang.cos(), ang.sin())
        return self._cache[key]

    @staticmethod
    def _rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (B, H, N, D), pos (B, N, 2) long (row, col) -> (B, H, N, D)."""
        d = x.shape[-1] // 2
        cos, sin = self._cos_sin(d, int(pos.max()) + 1, x.device, x.dtype)
        out = []
        for half, p in zip(x.chunk(2, dim=-1), (pos[..., 0], pos[..., 1])):
            c, s = F.embedding(p, cos)[:, None], F.embedding(p, sin)[:, None]  # (B, 1, N, d)
            out.append(half * c + self._rot(half) * s)
        return torch.cat(out, dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rope=None, norm_eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope

    def qkv_heads(self, x, pos):
        """x (B, N, C) -> q, k, v (B, H, N, D) after QK-norm and RoPE."""
        B, N, _C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v

    def forward(self, x, pos=None, attn_mask=None, kv_store=None, layer: int = 0):
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x, pos)
        if kv_store is not None:  # streaming: the held frames' K/V followed by this frame's
            k, v = kv_store.write(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False, init_values=None, rope=None, norm_eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x, pos=None, attn_mask=None, kv_store=None, layer: int = 0):
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos, attn_mask=attn_mask, kv_store=kv_store, layer=layer))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, C)
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2 with registers, as VGGT builds it (``interpolate_antialias=True``, offset 0, LayerScale 1.0)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_register_tokens, mlp_ratio=4.0):
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused at inference; in the state dict
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values=1.0, norm_eps=1e-6) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, npatch: int, H: int, W: int, dtype):
        N = self.pos_embed.shape[1] - 1
        if npatch == N and H == W:
            return self.pos_embed
        pe = self.pos_embed.float()
        M = int(math.sqrt(N))
        patch = F.interpolate(
            pe[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2),
            size=(H // self.patch_size, W // self.patch_size),
            mode="bicubic",
            antialias=True,
        )
        patch = patch.permute(0, 2, 3, 1).reshape(1, -1, pe.shape[-1])
        return torch.cat((pe[:, :1], patch), dim=1).to(dtype)

    def forward(self, x):
        """(B, 3, H, W) normalized -> normalized patch tokens (B, N, C)."""
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, H, W, x.dtype)
        x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1 + self.num_register_tokens :]


# --------------------------------------------------------------------------- the aggregator


class VGGTAggregator(nn.Module):
    """VGGT's ``Aggregator`` with a causal streaming ``step``. Module names = the checkpoint's."""

    def __init__(self, config: VGGTConfig | None = None):
        super().__init__()
        c = self.config = config or VGGTConfig()
        self.patch_embed = DinoVisionTransformer(
            c.img_size, c.patch_size, c.embed_dim, c.dino_depth, c.dino_heads, c.num_register_tokens, c.mlp_ratio
        )
        self.rope = RotaryPositionEmbedding2D(c.rope_freq) if c.rope_freq > 0 else None

        def blocks():
            return nn.ModuleList(
                Block(c.embed_dim, c.num_heads, c.mlp_ratio, qk_norm=True, init_values=c.init_values, rope=self.rope)
                for _ in range(c.depth)
            )

        self.frame_blocks = blocks()
        self.global_blocks = blocks()
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        self.patch_start_idx = 1 + c.num_register_tokens
        self.register_buffer("_resnet_mean", torch.tensor(_RESNET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(_RESNET_STD).view(1, 1, 3, 1, 1), persistent=False)

    # ---------------------------------------------------------------- shared pieces
    def tokens_per_frame(self, H: int, W: int) -> int:
        p = self.config.patch_size
        return self.patch_start_idx + (H // p) * (W // p)

    def _embed(self, images: torch.Tensor, first: torch.Tensor):
        """images (B, S, 3, H, W) in [0, 1]; first (S,) bool: uses the first-frame special tokens.
        -> tokens (B*S, P, C), pos (B*S, P, 2)."""
        B, S, _, H, W = images.shape
        if images.shape[2] != 3:
            raise ValueError(f"expected 3 input channels, got {images.shape[2]}")
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = (images - self._resnet_mean) / self._resnet_std
        patches = self.patch_embed(x.reshape(B * S, 3, H, W).to(self.camera_token.dtype))  # (B*S, N, C)
        idx = (~first).long().to(images.device)  # 0 for a stream's first frame, else 1
        cam = self.camera_token[0, idx].unsqueeze(0).expand(B, -1, -1, -1).reshape(B * S, 1, -1)
        reg = self.register_token[0, idx].unsqueeze(0).expand(B, -1, -1, -1).reshape(B * S, -1, patches.shape[-1])
        tokens = torch.cat((cam, reg, patches), dim=1)
        pos = None
        if self.rope is not None:
            h, w = H // p, W // p
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            grid = torch.stack((yy, xx), dim=-1).reshape(1, h * w, 2) + 1  # special tokens stay at 0
            pos = torch.cat((torch.zeros(1, self.patch_start_idx, 2, dtype=torch.long), grid), dim=1)
            pos = pos.to(images.device).expand(B * S, -1, -1)
        return tokens, pos

    # ---------------------------------------------------------------- reference (all frames at once)
    def forward(self, images: torch.Tensor, causal: bool = True, num_layers: int | None = None) -> list[torch.Tensor]:
        """images (B, S, 3, H, W) in [0, 1] -> list of ``num_layers`` (default depth) tensors
        (B, S, P, 2C). ``causal``: frame s attends globally to frames <= s only (the streaming
        semantics); ``causal=False`` is VGGT's bidirectional global attention."""
        B, S, _, _H, _W = images.shape
        first = torch.arange(S) == 0
        x, pos = self._embed(images, first)
        P, C = x.shape[1], x.shape[2]
        mask = None
        if causal:
            fid = torch.arange(S * P, device=x.device) // P
            mask = fid[:, None] >= fid[None, :]  # (S*P, S*P) True = attend
        gpos = pos.reshape(B, S * P, 2) if pos is not None else None
        out = []
        for i in range(num_layers or self.config.depth):
            x = self.frame_blocks[i](x.reshape(B * S, P, C), pos=pos)
            fr = x.reshape(B, S, P, C)
            x = self.global_blocks[i](x.reshape(B, S * P, C), pos=gpos, attn_mask=mask)
            out.append(torch.cat((fr, x.reshape(B, S, P, C)), dim=-1))
        return out

    # ---------------------------------------------------------------- streaming
    @torch.inference_mode()
    def step(self, image: torch.Tensor, memory, num_layers: int | None = None) -> list[torch.Tensor]:
        """One new frame ``image`` (B, 3, H, W) in [0, 1] against ``memory`` (a ``FrameKV`` holding
        the global-attention K/V of earlier frames, one entry per layer) -> list of (B, P, 2C).

        The frame's global attention sees the held frames plus itself; its K/V join the memory, which
        keeps the initial frames and a window of recent ones (trimmed as JanusVLN trims its cache: see
        :class:`~omnistream.memory.dual.MemoryConfig`). ``num_layers`` < depth skips
        the top blocks (their outputs and K/V are then never computed nor stored)."""
        n_layers = num_layers or self.config.depth
        if memory.num_layers < n_layers:
            raise ValueError(f"memory has {memory.num_layers} layers, the step needs {n_layers}")
        _B, _, _H, _W = image.shape
        first = torch.tensor([memory.frames_seen == 0])
        x, pos = self._embed(image[:, None], first)  # (B, P, C)
        P = x.shape[1]
        memory.begin(P, frame=P)
        out = []
        try:
            for i in range(n_layers):
                x = self.frame_blocks[i](x, pos=pos)
                fr = x
                x = self.global_blocks[i](x, pos=pos, kv_store=memory, layer=i)
                out.append(torch.cat((fr, x), dim=-1))
        except BaseException:
            memory.abort()
            raise
        memory.end()
        return out


# --------------------------------------------------------------------------- loading


def _infer_config(sd: dict, base: VGGTConfig | None = None) -> VGGTConfig:
    """Sizes from the aggregator state dict (keys without the ``aggregator.`` prefix)."""
    base = base or VGGTConfig()
    dim = sd["camera_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("frame_blocks."))
    dino_depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("patch_embed.blocks."))
    head_dim = sd["frame_blocks.0.attn.q_norm.weight"].shape[0]
    n = sd["patch_embed.pos_embed"].shape[1] - 1
    patch = sd["patch_embed.patch_embed.proj.weight"].shape[-1]
    hidden = sd["frame_blocks.0.mlp.fc1.weight"].shape[0]
    dino_heads = base.dino_heads if base.embed_dim == dim else max(1, dim // 64)
    return VGGTConfig(
        img_size=round(math.sqrt(n)) * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=dim // head_dim,
        mlp_ratio=hidden / dim,
        num_register_tokens=sd["register_token"].shape[2],
        rope_freq=base.rope_freq,
        init_values=base.init_values,
        dino_depth=dino_depth,
        dino_heads=dino_heads,
    )


def aggregator_state_dict(sd: dict, prefixes=("aggregator.", "vggt.aggregator.")) -> dict:
    """The aggregator's entries of a VGGT (``aggregator.*``) or JanusVLN (``vggt.aggregator.*``)
    state dict, prefix removed."""
    for pre in prefixes:
        sub = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
        if sub:
            return sub
    raise KeyError(f"no aggregator weights (keys starting with {' or '.join(prefixes)})")


def load_aggregator(sd: dict, config: VGGTConfig | dict | None = None, dtype=torch.float32) -> VGGTAggregator:
    """Build a :class:`VGGTAggregator` from an aggregator state dict (prefix already removed) and load it
    strictly (every checkpoint key must have a parameter and vice versa)."""
    if isinstance(config, dict):
        config = VGGTConfig.from_dict(config)
    config = config or _infer_config(sd)
    model = VGGTAggregator(config)
    model.load_state_dict(sd, strict=True)
    return model.to(dtype).eval()


def read_state_dict(path: str | Path) -> dict:
    """All tensors of a checkpoint directory or file (``*.safetensors`` shards or a torch ``.pt``)."""
    from safetensors.torch import load_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if p.is_dir() and not files:
        files = sorted(p.glob("*.pt")) + sorted(p.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{p}: no *.safetensors / *.pt weights")
    sd: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            sd.update(load_file(str(f)))
        else:
            obj = torch.load(str(f), map_location="cpu", weights_only=True)
            sd.update(obj.get("model", obj) if isinstance(obj, dict) else obj)
    return sd


def save_config(config: VGGTConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
