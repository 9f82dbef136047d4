#!/usr/bin/env python3
"""Crafts malformed fixtures for the bad-input CLI test (nsa-spec §6), with the standard library only.

    make_bad_inputs.py OUT_DIR            writes OUT_DIR/valid.safetensors, one file per bad case and
                                          OUT_DIR/cases.tsv: "<file>\t<fragment the error line must contain>"
    make_bad_inputs.py --corpus OUT_DIR   writes a small fuzzing seed corpus (valid and invalid files)

The valid problem: B=1, T=8, HQ=4, H=2, K=V=4, f32, block size 4, block count 2, gates and `do`.
"""
import json
import math
import os
import struct
import sys

B, T, HQ, H, K, V = 1, 8, 4, 2, 4, 4
META = {"nsa.format": "1", "nsa.block_size": "4", "nsa.block_count": "2", "nsa.window_size": "3"}
FORMATS = {"F64": "d", "F32": "f", "F16": "e", "I32": "i", "I64": "q"}
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def pack(dtype, values):
    return struct.pack("<%d%s" % (len(values), FORMATS[dtype]), *values)


def smooth(n, phase):
    """Deterministic, finite, not all equal."""
    return [math.sin(0.7 * i + phase) for i in range(n)]


def tensor(dtype, shape, values=None, phase=0.0):
    if values is None:
        values = smooth(numel(shape), phase)
    return (dtype, list(shape), pack(dtype, values))


def valid_tensors():
    return {
        "q": tensor("F32", [B, T, HQ, K], phase=0.1),
        "k": tensor("F32", [B, T, H, K], phase=0.2),
        "v": tensor("F32", [B, T, H, V], phase=0.3),
        "g_cmp": tensor("F32", [B, T, HQ], [0.5] * (B * T * HQ)),
        "g_slc": tensor("F32", [B, T, HQ], [0.25] * (B * T * HQ)),
        "g_swa": tensor("F32", [B, T, HQ], [0.125] * (B * T * HQ)),
        "do": tensor("F32", [B, T, HQ, V], phase=0.4),
    }


def header_and_data(tensors, metadata):
    """The header dict and data section of a well-formed file, tensors in the given order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def assemble(header_text, data, declared_len=None):
    raw = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    length = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", length) + raw + data


def file_bytes(tensors, metadata=META):
    header, data = header_and_data(tensors, metadata)
    return assemble(json.dumps(header), data)


def with_tensor(name, value, metadata=META, drop=()):
    t = valid_tensors()
    for d in drop:
        del t[d]
    if value is not None:
        t[name] = value
    return file_bytes(t, metadata)


def with_header_edit(edit, extra_data=b""):
    """A valid file whose parsed header goes through `edit(header) -> text or bytes` before assembly."""
    header, data = header_and_data(valid_tensors(), META)
    return assemble(edit(header), data + extra_data)


def bad_cases():
    """(file stem, bytes, fragment of the expected error line)."""
    cases = []

    def add(stem, data, fragment):
        cases.append((stem, data, fragment))

    valid = file_bytes(valid_tensors())
    # The container (reader) cases.
    add("empty_file", b"", "shorter than the 8-byte header length")
    add("truncated_prefix", valid[:5], "shorter than the 8-byte header length")
    add("header_over_100mb", struct.pack("<Q", 200_000_000) + valid[8:], "exceeds the 100 MB limit")
    add("header_past_end", struct.pack("<Q", len(valid)) + valid[8:], "runs past the end of the file")
    add("truncated_data", valid[:-3], "past the data section")
    add("header_not_brace", with_header_edit(lambda h: " " + json.dumps(h)), "does not start with '{'")
    add("invalid_utf8", with_header_edit(lambda h: json.dumps(h).replace('"q"', '"q\udcff"', 1).encode("utf-8", "surrogateescape")),
        "not valid UTF-8 JSON")
    add("invalid_json", with_header_edit(lambda h: json.dumps(h)[:-1] + ",}"), "not valid UTF-8 JSON")
    add("nul_after_json", with_header_edit(lambda h: json.dumps(h) + "\0"), "not valid UTF-8 JSON")
    add("metadata_not_string", with_header_edit(lambda h: json.dumps({**h, "__metadata__": {"nsa.block_size": 4}})),
        "__metadata__ value of 'nsa.block_size' is not a string")

    def entry_edit(name, field, value):
        def edit(h):
            h[name][field] = value
            return json.dumps(h)
        return edit

    add("unknown_dtype", with_header_edit(entry_edit("q", "dtype", "F8_E4M3")), "tensor 'q': unsupported dtype 'F8_E4M3'")
    add("negative_shape", with_header_edit(entry_edit("k", "shape", [1, -8, 2, 4])),
        "tensor 'k': shape dimensions must be non-negative integers")
    add("fractional_shape", with_header_edit(entry_edit("k", "shape", [1, 8.5, 2, 4])),
        "tensor 'k': shape dimensions must be non-negative integers")
    add("shape_overflow", with_header_edit(entry_edit("v", "shape", [2**62, 2**62, 1, 4])), "tensor 'v': shape overflows")

    def offsets_edit(name, begin_delta, end_delta):
        def edit(h):
            h[name]["data_offsets"][0] += begin_delta
            h[name]["data_offsets"][1] += end_delta
            return json.dumps(h)
        return edit

    add("offsets_wrong_size", with_header_edit(offsets_edit("g_cmp", 0, -4)), "tensor 'g_cmp': data_offsets span 124 bytes")
    add("offsets_past_end", with_header_edit(offsets_edit("do", 4, 4)), "tensor 'do': data_offsets end at")
    add("offsets_overlap", with_header_edit(offsets_edit("k", -4, -4), b"\0\0\0\0"), "data overlaps the previous tensor")
    add("offsets_gap", with_header_edit(offsets_edit("do", 4, 4), b"\0\0\0\0"), "tensor 'do': gap in the data section")
    add("trailing_bytes", with_header_edit(json.dumps, b"\0" * 12), "12 trailing bytes no tensor covers")

    def duplicate(h):
        text = json.dumps(h)
        q = json.dumps(h["q"])
        return text[:-1] + ', "q": ' + q + "}"

    add("duplicate_name", with_header_edit(duplicate), "tensor 'q': name appears twice in the header")
    add("control_char_name", with_header_edit(lambda h: json.dumps({**h, "x\ny": {"dtype": "F33", "shape": [],
                                                                                  "data_offsets": [0, 0]}})),
        "tensor 'x\\x0ay': unsupported dtype")

    # The problem cases.
    add("missing_q", with_tensor("q", None, drop=("q",)), "tensor 'q': required tensor is missing")
    add("q_rank_3", with_tensor("q", tensor("F32", [B, T, HQ * K])), "tensor 'q': expected 4 dimensions")
    add("k_dtype_mismatch", with_tensor("k", tensor("F64", [B, T, H, K])), "tensor 'k': dtype differs from q's F32")
    add("q_integer", with_tensor("q", tensor("I32", [B, T, HQ, K], [1] * (B * T * HQ * K))), "tensor 'q': dtype I32 is not a float type")
    add("heads_not_multiple",
        with_tensor("q", tensor("F32", [B, T, 3, K]), drop=("g_cmp", "g_slc", "g_swa", "do")),
        "HQ = 3 is not a multiple of kv heads H = 2")
    add("k_shape_mismatch", with_tensor("k", tensor("F32", [B, T + 1, H, K])),
        "tensor 'k': shape [1, 9, 2, 4] does not match the expected [1, 8, 2, 4]")
    add("v_heads_mismatch", with_tensor("v", tensor("F32", [B, T, 1, V])),
        "tensor 'v': shape [1, 8, 1, 4] does not match the expected [1, 8, 2, 4]")
    add("gate_shape_mismatch", with_tensor("g_slc", tensor("F32", [B, T, H])),
        "tensor 'g_slc': shape [1, 8, 2] does not match the expected [1, 8, 4]")
    add("do_shape_mismatch", with_tensor("do", tensor("F32", [B, T, HQ, K + 1])),
        "tensor 'do': shape [1, 8, 4, 5] does not match the expected [1, 8, 4, 4]")
    nan_q = smooth(B * T * HQ * K, 0.1)
    nan_q[17] = float("nan")
    add("nan_in_q", with_tensor("q", tensor("F32", [B, T, HQ, K], nan_q)), "tensor 'q': non-finite value nan at flat index 17")
    inf_do = smooth(B * T * HQ * V, 0.4)
    inf_do[3] = float("-inf")
    add("inf_in_do", with_tensor("do", tensor("F32", [B, T, HQ, V], inf_do)), "tensor 'do': non-finite value -inf at flat index 3")
    add("cu_not_from_zero", with_tensor("cu_seqlens", tensor("I32", [3], [1, 4, 8])), "tensor 'cu_seqlens': must start at 0")
    add("cu_decreasing", with_tensor("cu_seqlens", tensor("I32", [4], [0, 5, 2, 8])), "tensor 'cu_seqlens': decreases at position 2")
    add("cu_not_ending_at_t", with_tensor("cu_seqlens", tensor("I64", [3], [0, 4, 7])), "tensor 'cu_seqlens': must end at T = 8")
    batch2 = {
        "q": tensor("F32", [2, 4, HQ, K]), "k": tensor("F32", [2, 4, H, K]), "v": tensor("F32", [2, 4, H, V]),
        "cu_seqlens": tensor("I32", [2], [0, 4]),
    }
    add("cu_with_batch_2", file_bytes(batch2), "tensor 'cu_seqlens': varlen input needs batch size 1, got 2")
    # T = 8, BS = 4: valid blocks are 0 and 1.
    indices = [-1] * (B * T * H * 2)
    indices[(6 * H + 1) * 2] = 2
    add("block_indices_out_of_range", with_tensor("block_indices", tensor("I32", [B, T, H, 2], indices)),
        "tensor 'block_indices': value 2 at [0, 6, 1, 0] is outside [-1, 2)")
    indices = [-1] * (B * T * H * 2)
    indices[(5 * H + 0) * 2] = 1
    indices[(5 * H + 0) * 2 + 1] = 1
    add("block_indices_duplicated", with_tensor("block_indices", tensor("I64", [B, T, H, 2], indices)),
        "tensor 'block_indices': block 1 appears twice at [0, 5, 0]")
    counts = [2] * (B * T * H)
    counts[4] = 3
    add("block_counts_above_s", with_tensor("block_counts", tensor("I32", [B, T, H], counts)),
        "tensor 'block_counts': value 3 at flat index 4 is outside [0, S = 2]")
    counts[4] = -1
    add("block_counts_negative", with_tensor("block_counts", tensor("I32", [B, T, H], counts)),
        "tensor 'block_counts': value -1 at flat index 4 is outside [0, S = 2]")
    add("block_size_zero", with_tensor("q", None, metadata={**META, "nsa.block_size": "0"}), "block size must be positive, got 0")
    add("block_size_text", with_tensor("q", None, metadata={**META, "nsa.block_size": "sixty-four"}),
        "metadata nsa.block_size = 'sixty-four' is not an integer")
    add("bad_layout", with_tensor("q", None, metadata={**META, "nsa.layout": "thd"}), "metadata nsa.layout = 'thd'")
    return cases


def corpus():
    """Small seeds: a few valid problems (fixed, varlen, head-first, given indices, f16) and some bad cases."""
    seeds = {}
    small = {"q": tensor("F32", [1, 5, 2, 2], phase=1.0), "k": tensor("F32", [1, 5, 1, 2], phase=2.0),
             "v": tensor("F32", [1, 5, 1, 3], phase=3.0)}
    meta = {"nsa.block_size": "2", "nsa.block_count": "2"}
    seeds["valid_fixed"] = file_bytes(small, meta)
    seeds["valid_varlen"] = file_bytes({**small, "cu_seqlens": tensor("I32", [4], [0, 2, 2, 5]),
                                        "g_slc": tensor("F32", [1, 5, 2])}, meta)
    seeds["valid_head_first"] = file_bytes({"q": tensor("F32", [1, 2, 5, 2]), "k": tensor("F32", [1, 1, 5, 2]),
                                            "v": tensor("F32", [1, 1, 5, 3]), "g_cmp": tensor("F32", [1, 2, 5])},
                                           {**meta, "nsa.layout": "bhtd"})
    idx = [-1, -1, 0, -1, 0, 1, 1, 0, 2, -1]
    seeds["valid_given_indices"] = file_bytes({**small, "block_indices": tensor("I64", [1, 5, 1, 2], idx),
                                               "block_counts": tensor("I32", [1, 5, 1], [0, 1, 2, 1, 2])}, meta)
    seeds["valid_f16_with_do"] = file_bytes({"q": tensor("F16", [2, 3, 2, 2]), "k": tensor("F16", [2, 3, 2, 2]),
                                             "v": tensor("F16", [2, 3, 2, 1]), "do": tensor("F16", [2, 3, 2, 1])},
                                            {"nsa.scale": "0.5", "nsa.policy": "paper", "nsa.window_size": "2"})
    seeds["valid_empty_tensors"] = file_bytes({"q": tensor("F64", [1, 0, 1, 1], []), "k": tensor("F64", [1, 0, 1, 1], []),
                                               "v": tensor("F64", [1, 0, 1, 1], [])}, {})
    # The fuzz target also reads an input starting with '{' as header + data with the length prefix computed.
    for stem in ("valid_fixed", "valid_varlen", "valid_given_indices", "valid_head_first"):
        seeds["prefixless_" + stem[len("valid_"):]] = seeds[stem][8:]
    for stem, data, _ in bad_cases():
        if len(data) < 4096 and stem in ("header_past_end", "invalid_utf8", "offsets_overlap", "duplicate_name",
                                         "shape_overflow", "cu_decreasing", "block_indices_duplicated", "nan_in_q"):
            seeds["bad_" + stem] = data
    return seeds


def main(argv):
    if len(argv) == 3 and argv[1] == "--corpus":
        os.makedirs(argv[2], exist_ok=True)
        for stem, data in corpus().items():
            with open(os.path.join(argv[2], stem + ".safetensors"), "wb") as f:
                f.write(data)
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "valid.safetensors"), "wb") as f:
        f.write(file_bytes(valid_tensors()))
    # Valid for the CPU reference, too large a head dim for the CUDA backend (K, V <= 256).
    wide = {"q": tensor("F32", [1, 4, 2, 257]), "k": tensor("F32", [1, 4, 1, 257]), "v": tensor("F32", [1, 4, 1, 8])}
    with open(os.path.join(out, "k_dim_257.safetensors"), "wb") as f:
        f.write(file_bytes(wide, {"nsa.block_size": "2"}))
    with open(os.path.join(out, "cases.tsv"), "w", encoding="utf-8") as listing:
        for stem, data, fragment in bad_cases():
            with open(os.path.join(out, stem + ".safetensors"), "wb") as f:
                f.write(data)
            listing.write("%s.safetensors\t%s\n" % (stem, fragment))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
