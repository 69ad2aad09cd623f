"""llama.cpp's own ``llama-mtmd-cli``: build it from the package's engine source and run it.

``cli/CMakeLists.txt`` mirrors the package's engine options, so the CLI and ``glm4v_mtmd`` run
the same ggml kernels compiled with the same flags. Timings come from the CLI's log lines
(``mtmd batch encoding done in X ms`` from tools/mtmd/mtmd-cli.cpp and the
``llama_perf_context_print`` summary), which it prints at verbosity 4 (``-lv 4``).

llama.cpp's "prompt eval time" runs from the first prompt decode to the first synchronisation
(src/llama-context.cpp), so it includes the image encode that mtmd-cli runs between the text
chunks; the prompt time compared here is that figure minus the encode time.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import glm4v_mtmd

HERE = pathlib.Path(__file__).resolve().parent

_ENCODE = re.compile(r"mtmd batch encoding done in (\d+) ms")
_PROMPT = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_DECODE = re.compile(r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")
_BUFFER = re.compile(r"compute buffer size\s*=\s*([\d.]+) MiB")


@dataclass(frozen=True)
class RunSpec:
    """One generation request, given identically to the CLI and to ``Session.generate``."""

    model: str
    mmproj: str
    image: str
    text: str
    n_tokens: int
    n_ctx: int
    n_threads: int


def cli_build_dir(scratch: pathlib.Path) -> pathlib.Path:
    """Where ``bench/cli`` is built: ``scratch/cli-build``, unless another checkout (a CI clone, a
    worktree) configured it; CMake ties a build directory to one source directory, so such a
    checkout gets ``cli-build-<hash of its path>`` of its own."""
    source = HERE / "cli"
    shared = scratch / "cli-build"
    cache = shared / "CMakeCache.txt"
    if not cache.exists() or f"CMAKE_HOME_DIRECTORY:INTERNAL={source}\n" in cache.read_text(errors="replace"):
        return shared
    return scratch / f"cli-build-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"


def build_cli(build_dir: pathlib.Path, jobs: int = 2) -> pathlib.Path:
    """Configure and build ``llama-mtmd-cli`` (a no-op when up to date); returns the binary."""
    source = glm4v_mtmd.engine_info()["source_dir"]
    # Configure every time (a second or two): the package's engine tree may have moved (a new patch
    # set gets a new cache directory), and the CLI must be built from the same one.
    subprocess.run(["cmake", "-S", str(HERE / "cli"), "-B", str(build_dir), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DGLM4V_ENGINE_DIR={source}"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-mtmd-cli", "-j", str(jobs)], check=True)
    return build_dir / "llama-mtmd-cli"


def cli_command(binary: pathlib.Path, spec: RunSpec) -> list[str]:
    """The CLI invocation matching the package worker's settings (greedy, EOS ignored)."""
    return [str(binary), "-m", spec.model, "--mmproj", spec.mmproj, "--image", spec.image,
            "-p", spec.text, "-n", str(spec.n_tokens), "-c", str(spec.n_ctx), "-t", str(spec.n_threads),
            "--temp", "0", "--ignore-eos", "-b", "2048", "-lv", "4"]


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, str, float, int]:
    """Run ``cmd``; returns (stdout, stderr, wall seconds, peak RSS in bytes of that process)."""
    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{stderr[-3000:]}")
    return stdout, stderr, wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def parse_cli_log(log: str) -> dict[str, float]:
    """Encode, prompt and decode timings and compute-buffer sizes from the CLI's log."""
    enc, prompt, dec = _ENCODE.search(log), _PROMPT.search(log), _DECODE.search(log)
    if not (enc and prompt and dec):
        raise RuntimeError(f"could not find the CLI's timings in its log:\n{log[-3000:]}")
    decode_ms, runs = float(dec.group(1)), int(dec.group(2))
    encode_ms = float(enc.group(1))
    return {
        "encode_ms": encode_ms,
        "prompt_ms": float(prompt.group(1)) - encode_ms,
        "prompt_tokens": int(prompt.group(2)),
        "decode_ms": decode_ms,
        "decode_runs": runs,
        "decode_tok_s": 1000.0 * runs / decode_ms if decode_ms > 0 else 0.0,
        "compute_buffers_mib": sum(float(m) for m in _BUFFER.findall(log)),
    }


def run_cli(binary: pathlib.Path, spec: RunSpec) -> dict[str, float]:
    """One CLI run: its parsed timings plus wall time and peak RSS."""
    stdout, stderr, wall, rss = run_measured(cli_command(binary, spec))
    return {**parse_cli_log(stdout + stderr), "wall_s": wall, "peak_rss": rss}
