"""Mutations of valid GGUF files, and a crash-isolating runner that loads each one in a child process.

A case is a JSON-able dict: which file of the pair it damages (``"model"`` or ``"mmproj"``), a list of
``[offset, hex bytes]`` patches, an optional truncation length, and a description. The child process
(``python gguf_fuzz.py WORKDIR``) applies each case to a copy of the pair, loads it through ``Session``
and, when that succeeds, encodes an image and generates a few tokens; it writes one result line per case
*before* moving on, so when a case kills the process the parent knows which one it was, records a crash
and starts a new child after it.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

#: struct formats of the GGUF scalar types (7 = bool, one byte).
_PACK = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q", 6: "<f", 12: "<d", 7: "<B"}
_SCALAR_SIZE = {t: struct.calcsize(fmt) for t, fmt in _PACK.items()}
_STRING, _ARRAY = 8, 9


# ----------------------------------------------------------------------------- where things are in a file


@dataclass
class Layout:
    """Byte offsets of the fields a mutation may target."""

    size: int
    data_start: int = 0
    alignment: int = 32
    n_tensors: int = 0
    n_kv: int = 0
    string_lengths: list[tuple[int, int]] = field(default_factory=list)  # (offset of the u64, value)
    value_types: list[int] = field(default_factory=list)  # offset of each kv's u32 value type
    arrays: list[tuple[int, int]] = field(default_factory=list)  # (offset of element type u32, count)
    tensors: list[dict[str, Any]] = field(default_factory=list)  # name; offsets of n_dims, dims, type, offset
    keys: dict[str, int] = field(default_factory=dict)  # metadata key -> offset of its u32 value type
    numbers: list[tuple[str, int, int]] = field(default_factory=list)  # (key, GGUF type, offset of the value)
    number_arrays: list[tuple[str, int, int, int]] = field(default_factory=list)  # (key, type, first at, count)

    def tensor(self, name: str) -> dict[str, Any]:
        return next(t for t in self.tensors if t["name"] == name)


def _u(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _string(f: BinaryIO, lay: Layout) -> bytes:
    at = f.tell()
    n = _u(f, "<Q")
    lay.string_lengths.append((at, n))
    return f.read(n)


def layout(path: pathlib.Path) -> Layout:
    lay = Layout(size=path.stat().st_size)
    with open(path, "rb") as f:
        f.seek(8)
        lay.n_tensors, lay.n_kv = struct.unpack("<QQ", f.read(16))
        for _ in range(lay.n_kv):
            key = _string(f, lay).decode()
            lay.keys[key] = f.tell()
            lay.value_types.append(f.tell())
            vtype = _u(f, "<I")
            if vtype == _STRING:
                _string(f, lay)
            elif vtype == _ARRAY:
                lay.arrays.append((f.tell(), 0))
                etype, count = struct.unpack("<IQ", f.read(12))
                lay.arrays[-1] = (lay.arrays[-1][0], count)
                if etype == _STRING:
                    for _ in range(count):
                        _string(f, lay)
                else:
                    lay.number_arrays.append((key, etype, f.tell(), count))
                    f.seek(_SCALAR_SIZE[etype] * count, os.SEEK_CUR)
            else:
                lay.numbers.append((key, vtype, f.tell()))
                f.seek(_SCALAR_SIZE[vtype], os.SEEK_CUR)
        for _ in range(lay.n_tensors):
            name = _string(f, lay).decode()
            t: dict[str, Any] = {"name": name, "n_dims": f.tell()}
            n_dims = _u(f, "<I")
            at = f.tell()
            t["dims"] = [(at + 8 * i, d) for i, d in enumerate(struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims)))]
            t["type"] = f.tell()
            f.seek(4, os.SEEK_CUR)
            t["offset"] = (f.tell(), _u(f, "<Q"))
            lay.tensors.append(t)
        lay.data_start = -(-f.tell() // lay.alignment) * lay.alignment
    return lay


# ----------------------------------------------------------------------------- the mutations


def _q(v: int) -> str:
    return struct.pack("<Q", v % (1 << 64)).hex()


def _i(v: int) -> str:
    return struct.pack("<I", v % (1 << 32)).hex()


HUGE = (1 << 63, (1 << 64) - 1, 1 << 32, 1 << 40)


def mutations(which: str, lay: Layout, seed: int, per_kind: int) -> list[dict[str, Any]]:
    """About ``10 * per_kind`` cases damaging ``which`` (``"model"`` or ``"mmproj"``), reproducible from ``seed``."""
    rng = random.Random(seed)
    cases: list[dict[str, Any]] = []

    def add(kind: str, desc: str, patches: list[list[Any]], truncate: int | None = None) -> None:
        cases.append({"which": which, "kind": kind, "desc": f"{which}: {desc}", "patches": patches,
                      "truncate": truncate})

    # 1. truncation: across the header, at the data start and in the data.
    points = {8, 24, lay.data_start - 1, lay.data_start, lay.size - 1}
    points |= {rng.randrange(0, lay.data_start) for _ in range(per_kind // 2)}
    points |= {rng.randrange(lay.data_start, lay.size) for _ in range(per_kind - len(points))}
    for p in sorted(points):
        add("truncate", f"truncated to {p} bytes", [], p)
    # 2. random bytes in the header and metadata.
    for _ in range(per_kind):
        at = rng.randrange(0, lay.data_start)
        val = bytes(rng.randrange(256) for _ in range(rng.choice((1, 1, 2, 4))))
        add("header-bytes", f"{val.hex()} written at {at}", [[at, val.hex()]])
    # 3. absurd tensor and kv counts.
    for field_at, name, n in ((8, "tensor count", lay.n_tensors), (16, "kv count", lay.n_kv)):
        for v in (0, n - 1, n + 1, *HUGE):
            add("counts", f"{name} {n} -> {v}", [[field_at, _q(v)]])
    # 4. oversize (or short) strings.
    for at, n in rng.sample(lay.string_lengths, min(per_kind, len(lay.string_lengths))):
        v = rng.choice((*HUGE, lay.size, n + 1, max(0, n - 1), 0))
        add("strings", f"string length {n} at {at} -> {v}", [[at, _q(v)]])
    # 5. tensor data offsets past the end, misaligned, or onto another tensor.
    for _ in range(per_kind):
        t = rng.choice(lay.tensors)
        at, off = t["offset"]
        v = rng.choice((lay.size, lay.size - lay.data_start, off + 1, off + lay.alignment, *HUGE,
                        rng.choice(lay.tensors)["offset"][1]))
        add("offsets", f"tensor data offset {off} at {at} -> {v}", [[at, _q(v)]])
    # 6. tensor types: every ggml id and some that do not exist.
    for _ in range(per_kind):
        t = rng.choice(lay.tensors)
        v = rng.choice((*range(0, 42), 99, 1 << 31))
        add("types", f"tensor type at {t['type']} -> {v}", [[t["type"], _i(v)]])
    # 7. tensor shapes and dimension counts.
    for _ in range(per_kind):
        t = rng.choice(lay.tensors)
        if rng.random() < 0.25:
            v = rng.choice((0, 5, 1 << 31, len(t["dims"]) + 1, max(1, len(t["dims"]) - 1)))
            add("shapes", f"n_dims at {t['n_dims']} -> {v}", [[t["n_dims"], _i(v)]])
        else:
            at, d = rng.choice(t["dims"])
            v = rng.choice((0, 1, d + 1, d * 2, max(1, d // 2), d * 32, *HUGE))
            add("shapes", f"dim {d} at {at} -> {v}", [[at, _q(v)]])
    # 8. metadata arrays: element type and count.
    for _ in range(per_kind):
        at, count = rng.choice(lay.arrays)
        if rng.random() < 0.5:
            v = rng.choice((count + 1, max(0, count - 1), 0, *HUGE))
            add("arrays", f"array count {count} at {at + 4} -> {v}", [[at + 4, _q(v)]])
        else:
            v = rng.choice((*range(0, 13), 99))
            add("arrays", f"array element type at {at} -> {v}", [[at, _i(v)]])
    # 9. metadata value types.
    for _ in range(per_kind):
        at = rng.choice(lay.value_types)
        v = rng.choice((*range(0, 13), 13, 1 << 31))
        add("value-types", f"value type at {at} -> {v}", [[at, _i(v)]])
    # 10. tensor data: runs of random bytes, NaN and infinity patterns (the file still loads).
    for _ in range(per_kind):
        t = rng.choice(lay.tensors)
        at = lay.data_start + t["offset"][1] + rng.randrange(0, 64)
        val = rng.choice((b"\xff\xff" * 8, b"\x00\x7c" * 8, b"\x00\x00\xc0\x7f" * 4,
                          bytes(rng.randrange(256) for _ in range(16))))[: max(0, lay.size - at)]
        add("data", f"{val[:4].hex()}... written in tensor data at {at}", [[at, val.hex()]])
    return cases


#: The values every numeric key is set to, per GGUF type: zero, -1, one, small odd, 2^16 and one more,
#: the edges of 31 and 32 bits (as the type holds them), NaN, the infinities, tiny and huge.
_EDGE_INTS = (0, -1, 1, 7, 1 << 16, (1 << 16) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 2, (1 << 32) - 1)
_EDGE_FLOATS = (0.0, -1.0, 1.0, 7.0, 65536.0, 65537.0, 2.0**31, float("nan"), float("inf"), float("-inf"),
                1e-30, -1e-30, 1e30)


def _edge_values(vtype: int) -> list[bytes]:
    fmt = _PACK[vtype]
    if vtype in (6, 12):
        return [struct.pack(fmt, v) for v in _EDGE_FLOATS]
    if vtype == 7:  # bool: true, false and a byte that is neither
        return [struct.pack(fmt, v) for v in (0, 1, 2)]
    bits = 8 * struct.calcsize(fmt)
    out = []
    for v in {*_EDGE_INTS, (1 << bits) - 2, (1 << bits) - 1}:
        v %= 1 << bits
        if fmt[1].islower() and v >= 1 << (bits - 1):  # signed: the same bits
            v -= 1 << bits
        out.append(struct.pack(fmt, v))
    return sorted(set(out))


def value_mutations(which: str, lay: Layout) -> list[dict[str, Any]]:
    """Every numeric metadata value of ``which`` (and each element of its numeric arrays of up to 8
    elements, such as the M-RoPE sections) set to each value of :func:`_edge_values`, one at a time."""
    cases: list[dict[str, Any]] = []
    targets = [(key, vtype, at) for key, vtype, at in lay.numbers]
    for key, etype, first, count in lay.number_arrays:
        if count <= 8:
            size = _SCALAR_SIZE[etype]
            targets += [(f"{key}[{i}]", etype, first + i * size) for i in range(count)]
    for key, vtype, at in targets:
        for raw in _edge_values(vtype):
            value = struct.unpack(_PACK[vtype], raw)[0]
            cases.append({"which": which, "kind": "values", "desc": f"{which}: {key} = {value!r}",
                          "patches": [[at, raw.hex()]], "truncate": None})
    return cases


def apply(case: dict[str, Any], source: bytes) -> bytes:
    data = bytearray(source if case["truncate"] is None else source[: case["truncate"]])
    for at, hexval in case["patches"]:
        val = bytes.fromhex(hexval)
        data[at : at + len(val)] = val[: max(0, len(data) - at)]
    return bytes(data)


# ----------------------------------------------------------------------------- running the cases


@dataclass
class Outcome:
    counts: dict[str, int] = field(default_factory=dict)  # outcome name -> cases
    crashes: list[str] = field(default_factory=list)  # case descriptions (with the signal / exit code)
    untyped: list[str] = field(default_factory=list)  # cases that raised something not a Glm4vError

    def summary(self, n: int) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"{n} mutated GGUFs: {len(self.crashes)} crashes, {len(self.untyped)} untyped errors ({parts})"


def run_cases(cases: list[dict[str, Any]], model: pathlib.Path, mmproj: pathlib.Path, workdir: pathlib.Path,
              hang_s: float = 60.0) -> Outcome:
    """Run every case in child processes; a case that kills its process (or hangs) is recorded and skipped."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cases.json").write_text(json.dumps({"model": str(model), "mmproj": str(mmproj), "cases": cases}))
    results = workdir / "results.jsonl"
    results.write_text("")
    out = Outcome()
    start = 0
    while start < len(cases):
        log = open(workdir / "child.log", "ab")
        child = subprocess.Popen([sys.executable, __file__, str(workdir), str(start)], cwd=workdir,
                                 stdout=log, stderr=log)
        done = start
        last = time.monotonic()
        while child.poll() is None:
            time.sleep(0.05)
            n = len(results.read_text().splitlines())
            if n != done:
                done, last = n, time.monotonic()
            elif time.monotonic() - last > hang_s:
                child.kill()
                child.wait()
                break
        log.close()
        lines = results.read_text().splitlines()
        for line in lines[start:]:
            r = json.loads(line)
            out.counts[r["outcome"]] = out.counts.get(r["outcome"], 0) + 1
            if r["outcome"].startswith("untyped"):
                out.untyped.append(f"{cases[r['i']]['desc']}: {r['outcome']} {r.get('msg', '')}")
        start = len(lines)
        if start < len(cases):  # the child died (or hung) on case `start`
            how = "hang" if child.returncode in (-9,) else f"exit {child.returncode}"
            out.crashes.append(f"{cases[start]['desc']} ({how})")
            out.counts["crash"] = out.counts.get("crash", 0) + 1
            with open(results, "a") as f:
                f.write(json.dumps({"i": start, "outcome": "crash"}) + "\n")
            start += 1
    return out


def _child(workdir: pathlib.Path, start: int) -> None:
    import logging

    import numpy as np

    import glm4v_mtmd as g

    logging.getLogger("glm4v_mtmd").setLevel(logging.CRITICAL)
    spec = json.loads((workdir / "cases.json").read_text())
    sources = {k: pathlib.Path(spec[k]).read_bytes() for k in ("model", "mmproj")}
    paths = {k: workdir / f"case-{k}.gguf" for k in ("model", "mmproj")}
    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    with open(workdir / "results.jsonl", "a") as results:
        for i, case in enumerate(spec["cases"][start:], start):
            for k in ("model", "mmproj"):
                paths[k].write_bytes(apply(case, sources[k]) if case["which"] == k else sources[k])
            result: dict[str, Any] = {"i": i}
            try:
                with g.Session(paths["model"], paths["mmproj"], n_ctx=256, n_threads=1) as s:
                    emb = s.encode_image(image)
                    s.generate(["hello", emb, "world"], g.GenerationConfig(max_tokens=2, seed=0))
                result["outcome"] = "loaded-and-ran"
            except g.Glm4vError as exc:
                result["outcome"] = f"rejected:{type(exc).__name__}"
                result["msg"] = str(exc)[:300]
            except Exception as exc:  # noqa: BLE001 - counted: the test requires typed errors
                result["outcome"] = f"untyped:{type(exc).__name__}"
                result["msg"] = str(exc)[:200]
            results.write(json.dumps(result) + "\n")
            results.flush()


if __name__ == "__main__":
    _child(pathlib.Path(sys.argv[1]), int(sys.argv[2]))
