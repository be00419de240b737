"""ViT-B/16 image classification training (the Vision Transformer of Dosovitskiy et al.).

The workload: a transformer over image patches, the other half of image-model training
next to the convnets. Written in plain torch (timm and torchvision cannot be imported
beside the CPU torch wheel this project is tested with), with torchvision's vit_b_16
shapes: a 16x16 convolutional patch embedding, a class token, learned position
embeddings, 12 pre-norm encoder blocks (width 768, 12 heads, MLP 3072 with GELU), a final
LayerNorm and a 1000-class head on the class token; 86.6 M parameters at 224x224.
Attention goes through torch.nn.functional.scaled_dot_product_attention. Initialisation
as timm's: truncated-normal (std 0.02) linear weights and position embeddings, zero
biases. Trained with AdamW, lr 1e-3, weight decay 0.05, cross-entropy.

The data is synthetic: random 224x224 RGB images with random labels over 1000 classes,
drawn from a dedicated generator seeded from the seed autoopt sets before make_batch
(no download or JPEG decoding; the step's compute does not depend on the pixels).

What autoopt's transforms are expected to do on a GPU: bf16 autocast (the linear layers
and attention on tensor cores; this is where most of the gain is), SDPA's flash / memory-
efficient kernels (already used: the model calls scaled_dot_product_attention, and they
need bf16/fp16 to engage), torch.compile (fuses LayerNorm, GELU, residual adds and the
attention's reshapes), fused AdamW, and a larger batch. channels_last only touches the
patch-embedding convolution, so little is expected from it.

Environment (read when the file is imported): AUTOOPT_ZOO_IMAGE_SIZE, the image side in
pixels (default 224; must be a multiple of 16). Smaller sizes (e.g. 64: 16 patches) keep
CPU runs and tests short; the position embedding then has fewer entries.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 32
NUM_CLASSES = 1000
IMAGE_SIZE = int(os.environ.get("AUTOOPT_ZOO_IMAGE_SIZE", "224"))
PATCH = 16
D_MODEL = 768
N_HEAD = 12
N_LAYER = 12
D_MLP = 3072
DATA_SEED = 60_000  # added to autoopt's seed: the data generator's seed

if IMAGE_SIZE % PATCH:
    raise ValueError(f"AUTOOPT_ZOO_IMAGE_SIZE={IMAGE_SIZE} is not a multiple of the patch size {PATCH}")


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=1e-6)
        self.attn = SelfAttention(d_model, n_head)
        self.ln_2 = nn.LayerNorm(d_model, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = IMAGE_SIZE, patch: int = PATCH, d_model: int = D_MODEL,
                 n_head: int = N_HEAD, n_layer: int = N_LAYER, d_mlp: int = D_MLP, num_classes: int = NUM_CLASSES):
        super().__init__()
        n_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d_model, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, d_model))
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_head, d_mlp) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (N, patches, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def build_model() -> nn.Module:
    return VisionTransformer()


def make_batch(batch_size: int):
    g = torch.Generator().manual_seed(DATA_SEED + torch.initial_seed() % (2**31))
    images = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return images, labels


def forward(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
