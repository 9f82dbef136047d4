#!/usr/bin/env python3
"""Interop between nsa-verify and the official Python `safetensors` + `numpy` packages (nsa-spec §4).

    interop.py <path-to-nsa-verify> <work-dir>

* numpy -> nsa-verify: a problem written by safetensors.numpy.save_file (with metadata) runs; its outputs load
  with safetensors.numpy.load_file / safe_open and match a float64 NSA forward written here in numpy
  (mean pooling, compressed attention, seed top-k, selected attention on the file's indices, sliding window,
  gating), for fixed-length, varlen, head-first and float16 inputs.
* nsa-verify -> numpy: `gen` fixtures load in numpy with their metadata, are deterministic per seed, and
  `inspect --json` agrees with numpy on shapes, dtypes, min/max/mean and FNV-1a 64 checksums.
Exits 1 on any failure, including missing Python packages.
"""
import json
import math
import os
import subprocess
import sys

try:
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
except ImportError as e:  # CI installs them (scripts/setup.sh); a missing package is a failure, not a skip
    print("FAIL: the interop test needs numpy and safetensors (pip install numpy safetensors): %s" % e, file=sys.stderr)
    sys.exit(1)

NSA_VERIFY, WORK = sys.argv[1], sys.argv[2]
failures = []
checks = 0


def check(ok, what):
    global checks
    checks += 1
    if not ok:
        failures.append(what)
        print("FAIL: " + what, file=sys.stderr)


def nsa(*args):
    r = subprocess.run([NSA_VERIFY, *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def rel_l2(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    den = np.linalg.norm(e)
    return np.linalg.norm(a - e) / (den if den > 0 else 1.0)


# ---- an independent float64 NSA forward (token-major arrays) -------------------------------------------------

def sequences(B, T, cu):
    if cu is None:
        return [(b, 0, T) for b in range(B)]
    return [(0, int(cu[n]), int(cu[n + 1] - cu[n])) for n in range(len(cu) - 1)]


def softmax_attend(qv, keys, values, scale):
    """(o, lse) of one query over keys [n, K] / values [n, V]; an empty key set gives (0, 0)."""
    if len(keys) == 0:
        return np.zeros(values.shape[1]), 0.0
    z = scale * keys @ qv
    m = z.max()
    p = np.exp(z - m)
    lse = m + math.log(p.sum())
    return (p / p.sum()) @ values, lse


def nsa_forward(q, k, v, gates, BS, S, W, scale, cu=None, block_indices=None):
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    G = HQ // H
    seqs = sequences(B, T, cu)
    chunks = [-(-L // BS) for _, _, L in seqs]
    C = sum(chunks) if cu is not None else -(-T // BS)
    out = {name: np.zeros(shape) for name, shape in [
        ("k_cmp", (B, C, H, K)), ("v_cmp", (B, C, H, V)), ("o_cmp", (B, T, HQ, V)), ("lse_cmp", (B, T, HQ)),
        ("o_slc", (B, T, HQ, V)), ("lse_slc", (B, T, HQ)), ("o_swa", (B, T, HQ, V)), ("lse_swa", (B, T, HQ))]}
    topk = np.full((B, T, H, S), -1, np.int64)
    chunk_start = 0
    for (b, start, L), nb in zip(seqs, chunks):
        cs = chunk_start if cu is not None else 0
        for c in range(nb):
            toks = slice(start + c * BS, start + min((c + 1) * BS, L))
            out["k_cmp"][b, cs + c] = k[b, toks].mean(axis=0)
            out["v_cmp"][b, cs + c] = v[b, toks].mean(axis=0)
        kc, vc = out["k_cmp"][b, cs:cs + nb], out["v_cmp"][b, cs:cs + nb]
        for t in range(L):
            row = start + t
            nc, cur = (t + 1) // BS, t // BS
            probs = np.zeros((HQ, nb))
            for i in range(HQ):
                h = i // G
                o, lse = softmax_attend(q[b, row, i], kc[:nc, h], vc[:nc, h], scale)
                out["o_cmp"][b, row, i], out["lse_cmp"][b, row, i] = o, lse
                if nc:
                    probs[i, :nc] = np.exp(scale * kc[:nc, h] @ q[b, row, i] - lse)
            for h in range(H):  # seed policy: blocks c < cur by summed probability, the current block forced
                scores = {c: probs[h * G:(h + 1) * G, c].sum() for c in range(cur)}
                scores[cur] = float(G)
                chosen = sorted(scores, key=lambda c: (-scores[c], c))[:S]
                topk[b, row, h, :len(chosen)] = chosen
            idx = topk if block_indices is None else block_indices
            for i in range(HQ):
                h = i // G
                keys = [tok for c in idx[b, row, h] if c >= 0 and c * BS <= t
                        for tok in range(c * BS, min((c + 1) * BS - 1, t) + 1)]
                rows = [start + tok for tok in keys]
                out["o_slc"][b, row, i], out["lse_slc"][b, row, i] = softmax_attend(
                    q[b, row, i], k[b, rows, h], v[b, rows, h], scale)
                if W > 0:
                    lo = start + max(0, t - W + 1)
                    out["o_swa"][b, row, i], out["lse_swa"][b, row, i] = softmax_attend(
                        q[b, row, i], k[b, lo:row + 1, h], v[b, lo:row + 1, h], scale)
        chunk_start += nb
    o = np.zeros((B, T, HQ, V))
    for branch in ("cmp", "slc", "swa"):
        if "g_" + branch in gates:
            o += gates["g_" + branch][..., None] * out["o_" + branch]
    out["o"] = o
    out["block_indices"] = topk
    return out


def random_problem(rng, B, T, HQ, H, K, V, dtype=np.float32, with_do=True):
    t = {"q": rng.standard_normal((B, T, HQ, K)), "k": rng.standard_normal((B, T, H, K)),
         "v": rng.standard_normal((B, T, H, V))}
    for g in ("g_cmp", "g_slc", "g_swa"):
        t[g] = rng.uniform(0.1, 0.9, (B, T, HQ))
    if with_do:
        t["do"] = rng.standard_normal((B, T, HQ, V))
    return {name: a.astype(dtype) for name, a in t.items()}


def run_and_compare(label, inputs, metadata, BS, S, W, cu=None, head_first=False, tol=1e-10):
    """save_file -> nsa-verify run -> load_file; compares echoed inputs bit for bit and outputs with numpy."""
    path_in = os.path.join(WORK, label + "_in.safetensors")
    path_out = os.path.join(WORK, label + "_out.safetensors")
    stored = dict(inputs)
    if cu is not None:
        stored["cu_seqlens"] = np.asarray(cu, np.int32)
    if head_first:  # [B, T, X, D] -> [B, X, T, D]; gates [B, T, X] -> [B, X, T]
        stored = {n: (np.ascontiguousarray(np.swapaxes(a, 1, 2)) if a.ndim >= 3 else a) for n, a in stored.items()}
        metadata = {**metadata, "nsa.layout": "bhtd"}
    save_file(stored, path_in, metadata=metadata)
    rc, out, err = nsa("run", "-i", path_in, "-o", path_out, "--out-dtype", "f64")
    check(rc == 0, "%s: nsa-verify run exited %d: %s" % (label, rc, err.strip()))
    if rc != 0:
        return None
    loaded = load_file(path_out)
    with safe_open(path_out, framework="np") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
    check(keys == set(loaded), "%s: safe_open and load_file disagree on the tensor names" % label)
    check(meta.get("nsa.format") == "1", "%s: nsa.format is %r" % (label, meta.get("nsa.format")))
    check(meta.get("nsa.block_size") == str(BS), "%s: nsa.block_size is %r" % (label, meta.get("nsa.block_size")))
    check(meta.get("nsa.block_count") == str(S), "%s: nsa.block_count is %r" % (label, meta.get("nsa.block_count")))
    scale = float(meta.get("nsa.scale", "nan"))
    K = inputs["q"].shape[3]
    check(scale == 1 / math.sqrt(K), "%s: nsa.scale %r is not 1/sqrt(%d) at round-trip precision" % (label, meta.get("nsa.scale"), K))
    if head_first:
        check(meta.get("nsa.layout") == "bhtd", "%s: the output lost nsa.layout = bhtd" % label)
    for name, a in stored.items():
        got = loaded.get(name)
        check(got is not None and got.dtype == a.dtype and got.shape == a.shape and got.tobytes() == a.tobytes(),
              "%s: input %s is not echoed bit for bit" % (label, name))
    if head_first:  # back to token-major for the comparison
        loaded = {n: (np.swapaxes(a, 1, 2) if a.ndim >= 3 else a) for n, a in loaded.items()}
    for name in ("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa", "dk_cmp", "dv_cmp"):
        if "do" in inputs:
            check(name in loaded and np.all(np.isfinite(loaded[name])), "%s: gradient %s missing or not finite" % (label, name))
        else:
            check(name not in loaded, "%s: gradient %s written without `do`" % (label, name))
    x = {n: a.astype(np.float64) for n, a in inputs.items()}
    gates = {g: x[g] for g in ("g_cmp", "g_slc", "g_swa") if g in x}
    bi = loaded.get("block_indices")
    check(bi is not None and bi.dtype == np.int32, "%s: block_indices missing or not int32" % label)
    if bi is None:
        return loaded
    ref = nsa_forward(x["q"], x["k"], x["v"], gates, BS, S, W, 1 / math.sqrt(K), cu=cu, block_indices=bi.astype(np.int64))
    for name in ("k_cmp", "v_cmp", "o_cmp", "lse_cmp", "o_slc", "lse_slc", "o_swa", "lse_swa", "o"):
        if W == 0 and name in ("o_swa", "lse_swa"):
            check(name not in loaded, "%s: %s written with the window off" % (label, name))
            continue
        got = loaded.get(name)
        ok = got is not None and got.dtype == np.float64 and got.shape == ref[name].shape
        err = rel_l2(got, ref[name]) if ok else float("inf")
        check(ok and err <= tol, "%s: %s differs from numpy (rel-L2 %.3g, shape %s vs %s)" % (
            label, name, err, None if got is None else got.shape, ref[name].shape))
    check(np.abs(ref["o"]).max() > 0, "%s: the numpy reference output is all zero (a vacuous comparison)" % label)
    same = (bi == ref["block_indices"]).all(axis=-1)
    check(same.mean() == 1.0, "%s: top-k agrees with numpy on %.1f%% of rows" % (label, 100 * same.mean()))
    return loaded


def numpy_to_nsa():
    rng = np.random.default_rng(2024)
    meta = {"nsa.block_size": "4", "nsa.block_count": "3", "nsa.window_size": "5"}
    fixed = random_problem(rng, B=2, T=13, HQ=4, H=2, K=8, V=6)
    out_fixed = run_and_compare("fixed", fixed, meta, BS=4, S=3, W=5)
    out_hf = run_and_compare("head_first", fixed, meta, BS=4, S=3, W=5, head_first=True)
    if out_fixed is not None and out_hf is not None:
        for name in ("o", "lse_cmp", "block_indices", "dq", "dk_cmp"):
            check(np.array_equal(out_fixed[name], out_hf[name]), "head-first %s is not the transpose of token-major" % name)
    varlen = random_problem(rng, B=1, T=15, HQ=6, H=3, K=4, V=5)
    run_and_compare("varlen", varlen, meta, BS=4, S=3, W=5, cu=[0, 5, 5, 14, 15])
    half = random_problem(rng, B=1, T=11, HQ=2, H=1, K=16, V=8, dtype=np.float16, with_do=False)
    run_and_compare("float16", half, {"nsa.block_size": "2", "nsa.block_count": "4"}, BS=2, S=4, W=0)


def fnv1a64(data):
    h = 0xcbf29ce484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def nsa_to_numpy():
    rc, _, _ = nsa("gen", "--help")
    if rc != 0:
        print("SKIP: nsa-verify has no gen subcommand; fixtures written by nsa-verify are covered by `run` above")
        return
    a, b, c = (os.path.join(WORK, n + ".safetensors") for n in ("gen_a", "gen_b", "gen_c"))
    shape = ["--batch", "2", "--seqlen", "37", "--heads-q", "4", "--heads-kv", "2", "--dim-k", "8", "--dim-v", "16"]
    for path, seed, dtype in ((a, "5", "f32"), (b, "5", "f32"), (c, "6", "f16")):
        rc, _, err = nsa("gen", *shape, "--dtype", dtype, "--seed", seed, "--with-grads", "-o", path)
        check(rc == 0, "gen --seed %s --dtype %s exited %d: %s" % (seed, dtype, rc, err.strip()))
        if rc != 0:
            return
    with open(a, "rb") as fa, open(b, "rb") as fb:
        check(fa.read() == fb.read(), "gen is not deterministic: the same seed gave different files")
    ta, tc = load_file(a), load_file(c)
    with safe_open(a, framework="np") as f:
        meta = f.metadata() or {}
    check(meta.get("nsa.seed") == "5", "gen: nsa.seed is %r" % meta.get("nsa.seed"))
    check(meta.get("nsa.format") == "1", "gen: nsa.format is %r" % meta.get("nsa.format"))
    check(ta["q"].dtype == np.float32 and ta["q"].shape == (2, 37, 4, 8), "gen: q is %s %s" % (ta["q"].dtype, ta["q"].shape))
    check(ta["v"].shape == (2, 37, 2, 16), "gen: v shape %s" % (ta["v"].shape,))
    check("do" in ta, "gen --with-grads wrote no `do`")
    check(tc["q"].dtype == np.float16 and np.isfinite(tc["q"]).all(), "gen --dtype f16: q is not finite float16")
    check(np.std(ta["q"]) > 0.1, "gen: q looks constant")
    check(not np.array_equal(ta["q"], tc["q"].astype(np.float32)), "gen: seeds 5 and 6 gave the same q")
    # The generated fixture runs, and the run's output loads in numpy too.
    out = os.path.join(WORK, "gen_a_out.safetensors")
    rc, _, err = nsa("run", "-i", a, "-o", out)
    check(rc == 0, "run on a gen fixture exited %d: %s" % (rc, err.strip()))

    rc, _, _ = nsa("inspect", "--help")
    if rc != 0:
        print("SKIP: nsa-verify has no inspect subcommand")
        return
    report = os.path.join(WORK, "inspect.json")
    rc, text, err = nsa("inspect", a, c, "--json", report)
    check(rc == 0, "inspect exited %d: %s" % (rc, err.strip()))
    if rc != 0:
        return
    with open(report) as f:
        files = json.load(f)
    check(len(files) == 2, "inspect --json lists %d files, expected 2" % len(files))
    for entry, path in zip(files, (a, c)):
        arrays = load_file(path)
        with open(path, "rb") as f:
            whole = f.read()
        check(int(entry.get("fnv1a64", "0"), 16) == fnv1a64(whole), "inspect: file checksum of %s differs" % path)
        listed = {t["name"]: t for t in entry.get("tensors", [])}
        check(set(listed) == set(arrays), "inspect lists %s, numpy loads %s" % (sorted(listed), sorted(arrays)))
        for name, arr in arrays.items():
            t = listed.get(name)
            if t is None:
                continue
            check(t["shape"] == list(arr.shape), "inspect: %s shape %s, numpy %s" % (name, t["shape"], arr.shape))
            check(t["dtype"] == {"float32": "F32", "float16": "F16", "float64": "F64", "int32": "I32", "int64": "I64"}[str(arr.dtype)],
                  "inspect: %s dtype %s, numpy %s" % (name, t["dtype"], arr.dtype))
            check(int(t["fnv1a64"], 16) == fnv1a64(arr.astype(arr.dtype.newbyteorder("<")).tobytes()),
                  "inspect: checksum of %s differs from numpy's bytes" % name)
            if arr.size:
                wide = arr.astype(np.float64)
                for stat, value in (("min", wide.min()), ("max", wide.max()), ("mean", wide.mean())):
                    check(abs(t[stat] - value) <= 1e-9 * max(1.0, abs(value)),
                          "inspect: %s %s = %r, numpy %r" % (name, stat, t[stat], value))
        check(os.path.basename(path) in text, "inspect's table does not name %s" % path)


numpy_to_nsa()
nsa_to_numpy()
print("interop: %d checks, %d failed" % (checks, len(failures)))
sys.exit(1 if failures else 0)
