"""Net family ``rnn``: one LSTM or GRU cell, one direction, unrolled over the L time steps of a
(C, 1, L) input (C features per step), then a linear head on the last hidden state.

TVM's ONNX frontend has no LSTM, GRU or Scan (FIELD-NOTES), so the cell is written out in the
ops it does import: per step one Linear for every gate's input projection, one bias-free Linear
for the recurrent projection, constant gate slices, sigmoid/tanh and elementwise products
(kiln/nets/layers.py ``UnrolledRNN`` has the equations). The first step has no recurrent term.
MACs: the projections (L x C x G x H, (L - 1) x H x G x H with G = 4 gates for LSTM, 3 for GRU),
the head, and the gate products (LSTM: 2H at the first step, 3H after; GRU: H, then 2H)."""

from __future__ import annotations

from kiln.errors import ManifestError
from kiln.nets import Complexity, Plan, T
from kiln.schema import RnnArchitecture


def _steps(image_size: tuple[int, int]) -> int:
    if image_size[0] != 1:
        raise ManifestError(f"architecture: family rnn reads a (C, 1, L) sequence, but dataset.image_size is "
                            f"{tuple(image_size)}: set it to (1, L) (C features per step, L steps)")
    return image_size[1]


def plan(arch: RnnArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    steps, H = _steps(image_size), arch.hidden
    gates = 4 if arch.cell == "lstm" else 3
    g = Plan()
    x = g.input((in_ch, *image_size))
    g.params += in_ch * gates * H + gates * H + H * gates * H  # ih (with bias), hh (none)
    h = c = None

    def ih(t: T) -> T:
        g.macs += in_ch * gates * H
        g.kernel(in_ch * gates * H)
        return g.node((gates * H,), t)

    def hh(t: T) -> T:
        g.macs += H * gates * H
        g.kernel(H * gates * H)
        return g.node((gates * H,), t)

    def part(t: T) -> T:
        return g.slice(t, (H,))

    for _ in range(steps):
        gx = ih(g.slice(x, (in_ch,)))
        if arch.cell == "lstm":
            gg = gx if h is None else g.add(gx, hh(h))
            i = g.same(part(gg))
            f = g.same(part(gg))
            u = g.same(part(gg))
            o = g.same(part(gg))
            if c is None:
                c = g.mul(i, u)
            else:
                fc = g.mul(f, c)
                c = g.add(fc, g.mul(i, u))
            h = g.mul(o, g.same(c))
        elif h is None:
            z = g.same(part(gx))
            n = g.same(part(gx))
            h = g.sub(n, g.mul(z, n))
        else:
            gh = hh(h)
            r = g.same(g.add(part(gx), part(gh)))
            z = g.same(g.add(part(gx), part(gh)))
            a = part(gx)
            n = g.same(g.add(a, g.mul(r, part(gh))))
            h = g.add(n, g.mul(z, g.sub(h, n)))
    g.output(g.linear(h, classes))
    return g


def estimate(arch: RnnArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: RnnArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    from kiln.nets.layers import UnrolledRNN

    return UnrolledRNN(arch.cell, in_ch, arch.hidden, _steps(image_size), classes)
