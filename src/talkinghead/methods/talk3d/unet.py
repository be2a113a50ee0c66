"""The audio-guided attention U-Net F (Talk3D sec. 3.3, eqs. 4-5): identity triplane + tokens -> deltaplane.

Shapes: B batch, C channels, R plane side; a triplane batch is ``[B, 3, C, R, R]`` with the planes in
:data:`talkinghead.render.volume.PLANE_AXES` order (xy, xz, zy; plane p is ``[C, rows, cols]``, cols = first axis).

* Split convolution: each plane has its own convolutions (one grouped convolution, groups = 3), so the three
  orthogonal planes are never mixed channel-wise as a single EG3D-style CNN would.
* Roll-out blending (the Rodin "3D-aware convolution" the paper cites [23]) before every block: each plane gets,
  beside its own features, the other two planes' features averaged along the axis it does not share with
  them and broadcast along the one it does (plane xy gets xz averaged over z, as a function of x, and zy
  averaged over z, as a function of y). Input of a block: 3C channels per plane. The block's first convolution
  runs as :func:`rollout_conv`, the same function as the plain ``conv(rollout(x))`` (its reference in the tests)
  at about half the cost: the broadcast thirds' part of it is a 1-D convolution.
* Encoder: one level per ``channels`` entry, each level a block of two split 3x3 convolutions, halving the side
  between levels (the public code: 32 -> 64 -> 128 -> 256 channels, 256^2 -> 32^2).
* Bottleneck (eq. 4-5): the three planes' cells are flattened into 3 R_b^2 tokens, a 3-D positional encoding
  added (each cell's centre in the head box, its off-plane coordinate 0, plus a learned per-plane embedding);
  N_A layers of self-attention (F_SA) then cross-attention (F_CA) to the condition tokens t_n, each with a
  feed-forward (pre-norm transformer layers; our choice, the paper does not spell the layer out). An optional
  mask [3 R_b^2, M] keeps tokens from cells (Talk3D's method keeps the audio token to the cells near the mouth,
  :func:`region_cells`; see its model module).
* Decoder: upsampling, skip concatenation, split blocks back to R; the last split convolution starts at zero,
  so Delta P = 0 at the start of the audio stage and training starts from the static head (eq. 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rollout(x: Tensor) -> Tensor:
    """[B, 3, C, R, R] -> [B, 3, 3C, R, R]: each plane with the other two averaged onto its axes (see module)."""
    xy, xz, zy = x.unbind(1)  # xy: rows y, cols x; xz: rows z, cols x; zy: rows y, cols z
    R = x.shape[-1]
    x_of_xz = xz.mean(-2, keepdim=True)  # [B, C, 1, x]
    y_of_zy = zy.mean(-1, keepdim=True)  # [B, C, y, 1]
    x_of_xy = xy.mean(-2, keepdim=True)  # [B, C, 1, x]
    z_of_zy = zy.mean(-2, keepdim=True).transpose(-1, -2)  # [B, C, z, 1] (zy's columns are z)
    y_of_xy = xy.mean(-1, keepdim=True)  # [B, C, y, 1]
    z_of_xz = xz.mean(-1, keepdim=True).transpose(-1, -2)  # [B, C, 1, z] (xz's rows are z)
    e = (-1, -1, R, R)
    p_xy = torch.cat([xy, x_of_xz.expand(*e), y_of_zy.expand(*e)], 1)
    p_xz = torch.cat([xz, x_of_xy.expand(*e), z_of_zy.expand(*e)], 1)
    p_zy = torch.cat([zy, y_of_xy.expand(*e), z_of_xz.expand(*e)], 1)
    return torch.stack([p_xy, p_xz, p_zy], 1)


class SplitConv(nn.Module):
    """A convolution per plane: [B, 3, Cin, R, R] -> [B, 3, Cout, R', R'] (one grouped conv, groups = 3)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3 * cin, 3 * cout, k, stride=stride, padding=k // 2, groups=3)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C, H, W = x.shape
        y = self.conv(x.reshape(B, 3 * C, H, W))
        return y.reshape(B, 3, -1, y.shape[-2], y.shape[-1])


# Per plane (xy, xz, zy): which of its blended thirds (1 or 2, see rollout) is constant down the rows (a function
# of the column), and which is constant along the rows (a function of the row).
_COL_THIRD, _ROW_THIRD = (1, 1, 2), (2, 2, 1)


def rollout_conv(x: Tensor, conv: SplitConv) -> Tensor:
    """``conv(rollout(x))`` for a split 3x3 convolution (stride 1, zero padding 1) without building the roll-out:
    [B, 3, C, R, R] -> [B, 3, O, R, R], equal to the plain form up to float rounding.

    A blended third is constant along one image axis, so its part of the convolution is a 1-D convolution along
    the other axis, the same in every row (column) -- the kernel's rows (columns) summed -- except in the first
    and last, where one kernel row (column) falls on the zero padding and its term is taken off again. The
    plane's own third is convolved as usual. At cpu-small this halves the cost of the U-Net's first convolution
    in every block (3C -> C input channels per pixel)."""
    B, P, C, H, W = x.shape
    w = conv.conv.weight  # [3 O, 3 C, 3, 3]; group p (plane p) reads [own, first blend, second blend] x C
    if w.shape[-2:] != (3, 3) or conv.conv.stride != (1, 1) or H != W or H < 2:
        return conv(rollout(x))
    O = w.shape[0] // 3
    wg = w.view(3, O, 3, C, 3, 3)  # [plane, O, third, C, kernel row, kernel column]
    y = F.conv2d(x.reshape(B, 3 * C, H, W), wg[:, :, 0].reshape(3 * O, C, 3, 3), conv.conv.bias, padding=1,
                 groups=3).view(B, 3, O, H, W)
    xy, xz, zy = x.unbind(1)
    cols = [xz.mean(-2), xy.mean(-2), xz.mean(-1)]  # [B, C, R]: x of xz, x of xy, z of xz (xz's rows are z)
    rows = [zy.mean(-1), zy.mean(-2), xy.mean(-1)]  # y of zy, z of zy (zy's columns are z), y of xy
    # A column third is convolved along the columns once per kernel row ([kernel row, O, C, column taps]), a row
    # third along the rows once per kernel column; one grouped 1-D convolution for the six.
    kc = [wg[p, :, _COL_THIRD[p]].permute(2, 0, 1, 3) for p in range(3)]
    kr = [wg[p, :, _ROW_THIRD[p]].permute(3, 0, 1, 2) for p in range(3)]
    u = F.conv1d(torch.cat(cols + rows, 1), torch.cat(kc + kr).reshape(18 * O, C, 3), padding=1,
                 groups=6).view(B, 2, 3, 3, O, H)  # [B, column|row, plane, kernel row|column, O, R]
    full = u.sum(3)
    y = y + full[:, 0, :, :, None, :] + full[:, 1, :, :, :, None]
    y[..., 0, :] -= u[:, 0, :, 0]  # row 0 has no row above: kernel row 0 saw the padding
    y[..., -1, :] -= u[:, 0, :, 2]
    y[..., :, 0] -= u[:, 1, :, 0]
    y[..., :, -1] -= u[:, 1, :, 2]
    return y


class SplitBlock(nn.Module):
    """Roll-out, then two split 3x3 convolutions with LeakyReLU: [B, 3, Cin, R, R] -> [B, 3, Cout, R, R].

    The first convolution runs as :func:`rollout_conv` (the same function as ``c1(rollout(x))``, cheaper)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = SplitConv(3 * cin, cout)
        self.c2 = SplitConv(cout, cout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.leaky_relu(rollout_conv(x, self.c1), 0.2)
        return F.leaky_relu(self.c2(x), 0.2)


def _resample(x: Tensor, scale: float) -> Tensor:
    B, P, C, H, W = x.shape
    if scale < 1:
        y = F.avg_pool2d(x.reshape(B, P * C, H, W), int(round(1 / scale)))
    else:
        y = F.interpolate(x.reshape(B, P * C, H, W), scale_factor=scale, mode="bilinear", align_corners=False)
    return y.reshape(B, P, C, y.shape[-2], y.shape[-1])


def cell_positions(side: int) -> Tensor:
    """[3 * side^2, 3] the centre of each bottleneck cell in [-1, 1]^3: its plane's two coordinates
    (PLANE_AXES; column = first axis, row = second), the third axis at 0. Plane-major, row-major."""
    from talkinghead.render.volume import PLANE_AXES

    c = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    rows, cols = torch.meshgrid(c, c, indexing="ij")
    pos = []
    for a, b in PLANE_AXES:
        p = torch.zeros(side, side, 3)
        p[..., a], p[..., b] = cols, rows
        pos.append(p.reshape(-1, 3))
    return torch.cat(pos)


def region_cells(side: int, points: Tensor, radius: float) -> Tensor:
    """[3 * side^2] bool: the bottleneck cells within ``radius`` cells of one of ``points`` [P, 3] (normalised
    box coordinates) projected onto the cell's plane."""
    from talkinghead.render.volume import PLANE_AXES

    pos = cell_positions(side).reshape(3, side * side, 3)
    near = []
    for k, (a, b) in enumerate(PLANE_AXES):
        d = torch.cdist(pos[k][:, [a, b]], points[:, [a, b]].float())  # [S^2, P]
        near.append((d.min(1).values <= radius * 2 / side) if points.shape[0] else torch.zeros(side * side, dtype=torch.bool))
    return torch.cat(near)


def positional_encoding_3d(side: int, dim: int) -> Tensor:
    """[3 * side^2, dim] sinusoidal encoding of each bottleneck cell's 3-D position in [-1, 1]^3.

    Cell (row, col) of plane p sits at its plane's two coordinates (PLANE_AXES), the third axis at 0."""
    pos = cell_positions(side)  # [3 S^2, 3]
    nf = max(1, dim // 6)
    freqs = 2.0 ** torch.arange(nf, dtype=torch.float32) * math.pi
    ang = pos[..., None] * freqs  # [N, 3, nf]
    enc = torch.cat([torch.sin(ang), torch.cos(ang)], -1).reshape(pos.shape[0], -1)
    return F.pad(enc, (0, dim - enc.shape[1]))


class AttentionLayer(nn.Module):
    """One of the N_A bottleneck layers: e = e + SA(LN e); e = e + CA(LN e, t); e = e + FFN(LN e)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.sa = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ca = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, e: Tensor, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """e [B, N, d], tokens [B, M, d] -> (e [B, N, d], cross-attention weights [B, N, M]).

        ``mask`` [N, M] bool: True where cell n may not attend to token m."""
        h = self.n1(e)
        e = e + self.sa(h, h, h, need_weights=False)[0]
        a, w = self.ca(self.n2(e), tokens, tokens, attn_mask=mask, need_weights=True)
        e = e + a
        return e + self.ffn(self.n3(e)), w


class AttentionUNet(nn.Module):
    """Delta P = F(P_ID, t_n): [3, C, R, R] identity planes + tokens [B, M, d] -> deltaplanes [B, 3, C, R, R].

    ``d`` (the token width) is the bottleneck's channel count ``channels[-1]``. The encoder depends only on
    P_ID, so :meth:`encode` can be cached while P_ID is fixed (render time)."""

    def __init__(self, plane_channels: int, resolution: int, channels: tuple[int, ...], layers: int, heads: int):
        super().__init__()
        n = len(channels)
        if resolution % (2 ** (n - 1)):
            raise ValueError(f"plane resolution {resolution} is not divisible by 2^{n - 1}")
        self.dim = channels[-1]
        self.enc = nn.ModuleList(SplitBlock(cin, cout) for cin, cout in zip((plane_channels,) + channels[:-1], channels))
        self.side = resolution // 2 ** (n - 1)
        self.register_buffer("pos", positional_encoding_3d(self.side, self.dim), persistent=False)
        self.plane_embed = nn.Parameter(torch.zeros(3, self.dim))
        self.attn = nn.ModuleList(AttentionLayer(self.dim, heads) for _ in range(layers))
        # Decoder level i (from the bottom): upsample, concat the encoder skip of that level, a split block.
        self.dec = nn.ModuleList(SplitBlock(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(n - 1)))
        self.out = SplitConv(channels[0], plane_channels, k=3)
        nn.init.zeros_(self.out.conv.weight)
        nn.init.zeros_(self.out.conv.bias)

    def encode(self, planes: Tensor) -> list[Tensor]:
        """[3, C, R, R] -> the encoder's outputs per level, [1, 3, c_i, R_i, R_i] (the last is E)."""
        x, skips = planes[None], []
        for i, block in enumerate(self.enc):
            if i:
                x = _resample(x, 0.5)
            x = block(x)
            skips.append(x)
        return skips

    def forward(self, skips: list[Tensor], tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encoder outputs (``encode``) + tokens [B, M, d] -> (Delta P [B, 3, C, R, R], attention [B, 3 R_b^2, M]).

        ``mask`` [3 R_b^2, M] bool: True where a bottleneck cell may not attend to a token."""
        B = tokens.shape[0]
        E = skips[-1].expand(B, -1, -1, -1, -1)
        S = self.side
        e = E.permute(0, 1, 3, 4, 2).reshape(B, 3 * S * S, self.dim)  # flatten(E): plane-major, row-major
        e = e + self.pos + self.plane_embed.repeat_interleave(S * S, 0)
        w = None
        for layer in self.attn:
            e, w = layer(e, tokens, mask)
        x = e.reshape(B, 3, S, S, self.dim).permute(0, 1, 4, 2, 3)
        for block, skip in zip(self.dec, reversed(skips[:-1])):
            x = _resample(x, 2.0)
            x = block(torch.cat([x, skip.expand(B, -1, -1, -1, -1)], 2))
        return self.out(x), w
