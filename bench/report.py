"""Statistics, the results JSON, a Markdown table and a PNG chart of the ratios (Pillow only)."""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import socket
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class Ratio:
    """One compared quantity: median of the per-pair ratios and their spread."""

    name: str
    median: float
    low: float
    high: float
    best: float = float("nan")  # ratio of each side's best run: robust to a noisy neighbour
    target: Optional[str] = None  # e.g. ">= 0.97"; None for report-only ratios

    @property
    def passed(self) -> Optional[bool]:
        """Whether the median meets the target (None when there is no target)."""
        if self.target is None:
            return None
        op, value = self.target.split()
        return self.median >= float(value) if op == ">=" else self.median <= float(value)


def summary(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(name: str, num: list[float], den: list[float], target: Optional[str] = None, *,
          higher_is_better: bool = False) -> Ratio:
    """Ratio of paired runs (num[i] / den[i]); with one denominator it divides every numerator.

    ``best`` divides the best of ``num`` by the best of ``den`` (largest rate or smallest time).
    """
    dens = den if len(den) == len(num) else den * len(num)
    values = [n / d for n, d in zip(num, dens)]
    pick = max if higher_is_better else min
    return Ratio(name, statistics.median(values), min(values), max(values), pick(num) / pick(den), target)


def as_json(r: Ratio) -> dict:
    """A ratio as a JSON object, with its pass/fail."""
    return {**asdict(r), "passed": r.passed}


def markdown_table(ratios: list[Ratio]) -> str:
    """The README table: quantity, median ratio [spread], target, result."""
    lines = ["| Quantity | Ratio: median of pairs [min - max] | Ratio of best runs | Target | Result |",
             "|---|---|---|---|---|"]
    for r in ratios:
        verdict = {True: "pass", False: "**miss**", None: "report"}[r.passed]
        lines.append(f"| {r.name} | {r.median:.3f} [{r.low:.3f} - {r.high:.3f}] | {r.best:.3f} | "
                     f"{r.target or '-'} | {verdict} |")
    return "\n".join(lines)


def absolute_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    """(quantity, unit, summary) rows as a Markdown table of medians and ranges."""
    lines = ["| Quantity | Median | Range | Runs |", "|---|---|---|---|"]
    for name, unit, s in rows:
        lines.append(f"| {name} ({unit}) | {s['median']:.4g} | {s['min']:.4g} - {s['max']:.4g} | {s['n']} |")
    return "\n".join(lines)


def chart(ratios: list[Ratio], path: pathlib.Path, title: str) -> None:
    """Horizontal bars of the ratios on a log scale around 1, with whiskers and target ticks."""
    import math

    row, left, width = 34, 430, 520
    img = Image.new("RGB", (left + width + 40, 60 + row * len(ratios)), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    lo, hi = math.log10(0.01), math.log10(100.0)

    def x(v: float) -> float:
        return left + width * (min(max(math.log10(max(v, 1e-9)), lo), hi) - lo) / (hi - lo)

    draw.text((10, 8), title, fill="black", font=font)
    for tick in (0.01, 0.1, 1, 10, 100):
        draw.line([(x(tick), 30), (x(tick), img.height - 10)], fill="#dddddd")
        draw.text((x(tick) - 8, img.height - 12), f"{tick:g}", fill="gray", font=font)
    for i, r in enumerate(ratios):
        y = 40 + i * row
        colour = {True: "#3a7d44", False: "#c0392b", None: "#4a6fa5"}[r.passed]
        draw.text((10, y + 6), f"{r.name[:60]}  {r.median:.3g}", fill="black", font=font)
        x0, x1 = sorted((x(1.0), x(r.median)))
        draw.rectangle([(x0, y + 4), (x1, y + row - 10)], fill=colour)
        cx, cy = x(r.median), y + row // 2 - 3
        draw.ellipse([(cx - 4, cy - 4), (cx + 4, cy + 4)], fill=colour, outline="black")
        draw.line([(x(r.low), y + row // 2 - 3), (x(r.high), y + row // 2 - 3)], fill="black", width=2)
        if r.target:
            tx = x(float(r.target.split()[1]))
            draw.line([(tx, y), (tx, y + row - 6)], fill="black", width=3)
    img.save(path)


# (engine CPU feature, results tag), first match wins. AMX (Xeon, Sapphire Rapids and later; the engine
# reports AMX_INT8) is a class of its own: its BF16 matmuls and attention run on AMX tiles (patches 0009, 0010).
CPU_CLASSES = (("AMX_INT8", "amx"), ("AVX512_BF16", "avx512bf16"), ("AVX512", "avx512"), ("AVX2", "avx2"))


def cpu_class() -> str:
    """The vector ISA class of this CPU, as the engine detected it: results from different machine kinds
    must not overwrite each other under the same host name."""
    import glm4v_mtmd

    features = glm4v_mtmd.cpu_features()
    for name, tag in CPU_CLASSES:
        if name in features:
            return tag
    return platform.machine().lower() or "cpu"


def result_stem(suffix: str, now: Optional[datetime.datetime] = None, cpu: Optional[str] = None) -> str:
    """``<UTC date>-<host>-<cpu class><suffix>``: the file name, without extension, of a results file
    (``cpu``: the class measured, where a run limits both sides to less than this CPU has)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y-%m-%d}-{socket.gethostname()}-{cpu or cpu_class()}{suffix}"


def save_results(out_dir: pathlib.Path, suffix: str, data: dict, ratios: list[Ratio],
                 table: list[tuple[str, str, dict[str, float]]], title: str, cpu: Optional[str] = None) -> pathlib.Path:
    """``out_dir/<result_stem(suffix)>.json`` (``data`` with the date, the ratios and the table) and
    the chart next to it; prints the Markdown tables. Returns the JSON path."""
    now = datetime.datetime.now(datetime.timezone.utc)
    stem = result_stem(suffix, now, cpu)
    out_dir.mkdir(exist_ok=True)
    full = {"date": now.isoformat(timespec="seconds"), **data, "ratios": [as_json(r) for r in ratios],
            "absolute": [{"quantity": n, "unit": u, **s} for n, u, s in table]}
    path = out_dir / f"{stem}.json"
    # Paths under the home directory are written as ~/...: results name no machine's directories.
    text = json.dumps(full, indent=1).replace(json.dumps(str(pathlib.Path.home()))[1:-1] + "/", "~/")
    path.write_text(text, encoding="utf-8")
    chart(ratios, out_dir / f"{stem}.png", title)
    print(markdown_table(ratios) + "\n\n" + absolute_table(table))
    print(f"\nwrote {out_dir / stem}.json and .png", file=sys.stderr)
    return path
