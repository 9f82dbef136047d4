#!/usr/bin/env python3
"""An independent re-implementation of the fixture generator documented in verify/generator.h.

Prints the FNV-1a 64 checksum of each generated input tensor's bytes for a small problem, so the values pinned
in verify/generator_test.cpp can be re-derived without the C++ code:
    python3 scripts/philox_reference.py
Needs numpy only (for float32 / float16 rounding).
"""
import math
import struct

import numpy as np

M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0 = (k0 + 0x9E3779B9) & M32
            k1 = (k1 + 0xBB67AE85) & M32
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def block(seed, stream, j):
    return philox4x32_10((j & M32, j >> 32, stream & M32, stream >> 32), (seed & M32, seed >> 32))


def word(seed, name, n):
    return block(seed, fnv1a64(name.encode()), n // 4)[n % 4]


def normals(seed, name, count):
    stream = fnv1a64(name.encode())
    out = []
    for j in range((count + 1) // 2):
        w = block(seed, stream, j)
        a = ((w[1] << 32) | w[0]) >> 11
        b = ((w[3] << 32) | w[2]) >> 11
        u1 = float((1 << 53) - a) / 9007199254740992.0
        u2 = float(b) / 9007199254740992.0
        r = math.sqrt(-2.0 * math.log(u1))
        ang = 6.283185307179586 * u2
        out += [float(np.float32(r * math.cos(ang))), float(np.float32(r * math.sin(ang)))]
    return out[:count]


def gates(seed, name, count):
    return [float(np.float32(1.0 / (1.0 + math.exp(-z)))) for z in normals(seed, name, count)]


def to_bf16_bytes(values):
    out = bytearray()
    for x in values:
        bits = struct.unpack("<I", struct.pack("<f", x))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out += struct.pack("<H", bits)
    return bytes(out)


def as_bytes(values, dtype):
    if dtype == "f32":
        return np.array(values, dtype=np.float32).tobytes()
    if dtype == "f64":
        return np.array(values, dtype=np.float64).tobytes()
    if dtype == "f16":
        return np.array(values, dtype=np.float32).astype(np.float16).tobytes()
    return to_bf16_bytes(values)


if __name__ == "__main__":
    seed = 20261126
    B, T, HQ, H, K, V = 1, 21, 4, 2, 8, 6
    print("first normals of q, seed %d:" % seed, ["%.9g" % x for x in normals(seed, "q", 4)])
    for dtype in ("f32", "bf16"):
        for name, count, gen in (("q", B * T * HQ * K, normals), ("k", B * T * H * K, normals),
                                 ("v", B * T * H * V, normals), ("do", B * T * HQ * V, normals),
                                 ("g_cmp", B * T * HQ, gates), ("g_swa", B * T * HQ, gates)):
            print("%-4s %-5s fnv1a64 %016x" % (dtype, name, fnv1a64(as_bytes(gen(seed, name, count), dtype))))
    S = 3
    counts = [word(seed, "block_counts", r) % (S + 1) for r in range(B * T * H)]
    print("block_counts (S=3):", counts)
