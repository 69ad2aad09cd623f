"""llama.cpp's own ``llama-server``, built from the package's engine tree with the package's engine options.

The baseline for bench/serve.py: the same ggml kernels as glm4v_mtmd (bench/cli/CMakeLists.txt), served
over llama.cpp's HTTP API (/v1/chat/completions, /health). The package's engine tree holds only what the
package builds, so the server's sources are extracted from the same pinned source distribution, as
bench/batched.py does for llama-batched-bench. The web UI is left out (no npm build, no download): the
server is built with an empty asset table, as upstream does with -DLLAMA_BUILD_UI=OFF
-DLLAMA_USE_PREBUILT_UI=OFF.

    python bench/llama_server.py       # build (a no-op when up to date) and print the binary's path
"""

from __future__ import annotations

import pathlib
import subprocess
import tarfile

from batched import HERE, SCRATCH, pinned_sdist
from cli_target import cli_build_dir

import glm4v_mtmd

# What the server build needs, relative to the sdist's vendor/llama.cpp: the server's sources
# (not its tests, benchmarks or docs), the UI templates and the script that fills them.
_SERVER_DIR = "tools/server/"
_EXTRA_FILES = ("tools/ui/ui.cpp.in", "tools/ui/ui.h.in", "scripts/ui-assets.cmake")


def server_sources(out: pathlib.Path) -> pathlib.Path:
    """tools/server's sources and the UI generator's inputs from the pinned source distribution.

    ``out`` becomes a small llama.cpp-shaped tree (tools/server, tools/ui, scripts) for
    -DGLM4V_SERVER_SRC_DIR.
    """
    if (out / _SERVER_DIR / "server.cpp").exists() and all((out / f).exists() for f in _EXTRA_FILES):
        return out
    sdist = pinned_sdist()
    root = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    wanted = 0
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(root):
                continue
            rel = member.name[len(root):]
            in_server = (rel.startswith(_SERVER_DIR) and "/" not in rel[len(_SERVER_DIR):]
                         and rel.endswith((".cpp", ".h")))
            if not in_server and rel not in _EXTRA_FILES:
                continue
            data = tar.extractfile(member)
            assert data is not None
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data.read())
            wanted += 1
    if not (out / _SERVER_DIR / "server.cpp").exists() or not all((out / f).exists() for f in _EXTRA_FILES):
        raise RuntimeError(f"{sdist} lacks llama-server's sources ({wanted} files extracted)")
    return out


def build_llama_server(build_dir: pathlib.Path, jobs: int = 2) -> pathlib.Path:
    """Configure and build ``llama-server`` next to the CLI (a no-op when up to date).

    Keeps llama-batched-bench configured when bench/batched.py built it in the same directory.
    """
    sources = server_sources(build_dir / "llama-server-src")
    source = glm4v_mtmd.engine_info()["source_dir"]
    cmd = ["cmake", "-S", str(HERE / "cli"), "-B", str(build_dir), "-G", "Ninja",
           "-DCMAKE_BUILD_TYPE=Release", f"-DGLM4V_ENGINE_DIR={source}", f"-DGLM4V_SERVER_SRC_DIR={sources}"]
    if (build_dir / "batched-bench-src").exists():
        cmd.append(f"-DGLM4V_BATCHED_BENCH_DIR={build_dir / 'batched-bench-src'}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], check=True)
    return build_dir / "llama-server"


if __name__ == "__main__":
    print(build_llama_server(cli_build_dir(SCRATCH)))
