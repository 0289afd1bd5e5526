"""The torch modules of the families that are not a plain ``nn.Sequential`` (residual blocks,
unrolled recurrent cells). Module-level classes, so built models pickle and deep-copy; this
module imports torch and is imported only by the families' ``build`` (never at manifest load).

Every forward stays in Kiln's op vocabulary and is fx-traceable: no tensor creation, no use of
``x.shape``, constant slices only."""

from __future__ import annotations

import torch
import torch.nn as nn

from kiln.nets import same_padding


def conv(cin: int, cout: int, k, stride, size: tuple[int, int], groups: int = 1, bias: bool = True):
    """nn.Conv2d with 'same' padding (kiln.nets.same_padding) for this input size, and its output size."""
    (kh, kw) = (k, k) if isinstance(k, int) else tuple(k)
    (sh, sw) = (stride, stride) if isinstance(stride, int) else tuple(stride)
    ph, pw = same_padding(size[0], kh, sh), same_padding(size[1], kw, sw)
    out = ((size[0] + 2 * ph - kh) // sh + 1, (size[1] + 2 * pw - kw) // sw + 1)
    return nn.Conv2d(cin, cout, (kh, kw), (sh, sw), padding=(ph, pw), groups=groups, bias=bias), out


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut (identity, or a 1x1 conv (+BN) where the
    shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, size: tuple[int, int], shortcut_bn: bool = True):
        super().__init__()
        self.conv1, out = conv(cin, cout, 3, stride, size)
        self.bn1, self.relu1 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, _ = conv(cout, cout, 3, 1, out)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.shortcut = None
        if stride != 1 or cin != cout:
            sc, _ = conv(cin, cout, 1, stride, size)
            self.shortcut = nn.Sequential(sc, nn.BatchNorm2d(cout)) if shortcut_bn else nn.Sequential(sc)
        self.out_size = out

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        s = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(y + s)


class ResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, basic blocks ((cin, cout, stride) each), global average pool, linear."""

    def __init__(self, in_ch: int, stem: int, blocks, classes: int, size: tuple[int, int], shortcut_bn: bool = True):
        super().__init__()
        c, size = conv(in_ch, stem, 3, 1, size)
        self.stem = nn.Sequential(c, nn.BatchNorm2d(stem), nn.ReLU())
        layers = []
        width = stem
        for cin, cout, s in blocks:
            layers.append(BasicBlock(cin, cout, s, size, shortcut_bn))
            size, width = layers[-1].out_size, cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class UnrolledRNN(nn.Module):
    """An LSTM or GRU cell, one direction, unrolled over the ``steps`` time steps of a (C, 1, L)
    input, then a linear head on the last hidden state.

    Each step's input is ``x[:, :, 0, t]`` (N, C). One Linear (``ih``, with bias) projects it to
    every gate at once; one Linear without bias (``hh``) projects the hidden state; the gates are
    constant slices ``g[:, a:b]``. The first step has no recurrent term (h0 = c0 = 0, so no
    zero tensor is created). LSTM (gate order i, f, g, o as torch's nn.LSTM):
    ``c = f * c + i * g``, ``h = o * tanh(c)``. GRU (gates r, z, n as nn.GRU, the recurrent
    bias of n folded away): ``n = tanh(xn + r * hn)``, ``h = n + z * (h - n)``."""

    def __init__(self, cell: str, in_ch: int, hidden: int, steps: int, classes: int):
        super().__init__()
        self.cell, self.hidden, self.steps = cell, hidden, steps
        gates = 4 if cell == "lstm" else 3
        self.ih = nn.Linear(in_ch, gates * hidden)
        self.hh = nn.Linear(hidden, gates * hidden, bias=False)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        H = self.hidden
        h = c = None
        for t in range(self.steps):
            gx = self.ih(x[:, :, 0, t])
            if self.cell == "lstm":
                g = gx if h is None else gx + self.hh(h)
                i = torch.sigmoid(g[:, 0:H])
                f = torch.sigmoid(g[:, H:2 * H])
                u = torch.tanh(g[:, 2 * H:3 * H])
                o = torch.sigmoid(g[:, 3 * H:4 * H])
                c = i * u if c is None else f * c + i * u
                h = o * torch.tanh(c)
            elif h is None:
                z = torch.sigmoid(gx[:, H:2 * H])
                n = torch.tanh(gx[:, 2 * H:3 * H])
                h = n - z * n
            else:
                gh = self.hh(h)
                r = torch.sigmoid(gx[:, 0:H] + gh[:, 0:H])
                z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H])
                n = torch.tanh(gx[:, 2 * H:3 * H] + r * gh[:, 2 * H:3 * H])
                h = n + z * (h - n)
        return self.head(h)
