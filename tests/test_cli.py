"""The glm4v-mtmd command line, end to end on a tiny model (subprocesses, outside the source tree)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import random_image
from PIL import Image


def _cli(args, tmp_path, stdin=None):
    # cwd outside the source tree, so the installed package (with its compiled module) is imported
    # HF_HUB_OFFLINE: a hub lookup must fail fast here, never reach for the network
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "glm4v_mtmd", *args], cwd=tmp_path, input=stdin, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(gguf_pair, tmp_path_factory):
    model, mmproj = gguf_pair("glm4v", 0, "f32")
    image = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(random_image(84, 112)).save(image)
    return model, mmproj, image


@pytest.mark.parametrize("command", [[], ["run"], ["chat"], ["info"], ["convert"], ["selfcheck"]])
def test_help_everywhere(command, tmp_path):
    out = _cli([*command, "--help"], tmp_path)
    assert out.returncode == 0 and "usage: glm4v-mtmd" in out.stdout


def test_run_streams_a_reply(files, tmp_path):
    model, mmproj, image = files
    out = _cli(["run", "-m", str(model), "--mmproj", str(mmproj), "-i", str(image), "-p", "Describe.",
                "--max-tokens", "8", "--temperature", "0"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_run_hide_thinking_prints_less(files, tmp_path):
    model, mmproj, image = files
    common = ["run", "-m", str(model), "-i", str(image), "--max-tokens", "12", "--temperature", "0"]
    shown, hidden = _cli(common, tmp_path), _cli([*common, "--hide-thinking"], tmp_path)
    assert shown.returncode == hidden.returncode == 0
    assert len(hidden.stdout) <= len(shown.stdout)


def test_chat_reads_turns_and_images(files, tmp_path):
    model, mmproj, image = files
    out = _cli(["chat", "-m", str(model), "--max-tokens", "4", "--temperature", "0"], tmp_path,
               stdin=f"/image {image}\nWhat is this?\nAnd now?\n/quit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") >= 3


def test_info_reports_engine_and_model(files, tmp_path):
    out = _cli(["info", str(files[0])], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "engine_commit" in out.stdout and "general.architecture: glm4" in out.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
    out = _cli(["run", "-m", str(tmp_path / "missing-dir"), "--quant", "Q4_K_M"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("glm4v-mtmd: error:") and "Traceback" not in out.stderr


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


def test_offline_run_fails_fast_and_names_the_ways_forward(files, tmp_path):
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf-home"))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "glm4v_mtmd", "run", "-i", str(files[2])], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert out.returncode == 1
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert "cannot be reached" in out.stderr
    for hint in ("--model PATH", "cache", "selfcheck"):
        assert hint in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one message, said once


def test_a_directory_with_one_model_loads_whatever_its_quant(files, tmp_path):
    model, mmproj, image = files
    one = tmp_path / "one"
    one.mkdir()
    (one / "tiny-F32.gguf").symlink_to(model)
    (one / mmproj.name).symlink_to(mmproj)
    out = _cli(["run", "-m", str(one), "-i", str(image), "--max-tokens", "3", "--temperature", "0"], tmp_path)
    assert out.returncode == 0, out.stderr
    (one / "tiny-Q8_0.gguf").symlink_to(model)
    out = _cli(["run", "-m", str(one), "-i", str(image), "--max-tokens", "3"], tmp_path)
    assert out.returncode == 1
    assert "F32, Q8_0" in out.stderr and "--quant" in out.stderr
    out = _cli(["run", "-m", str(one), "-q", "f32", "-i", str(image), "--max-tokens", "3"], tmp_path)
    assert out.returncode == 0, out.stderr


def test_chat_confirms_images_and_knows_its_commands(files, tmp_path):
    model, mmproj, image = files
    out = _cli(["chat", "-m", str(model), "--max-tokens", "3", "--temperature", "0"], tmp_path,
               stdin=f"/help\n/image {image}\n/image {tmp_path / 'nope.png'}\n/bogus\nWhat is this?\n/quit\n")
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert err.index("Model loaded") < err.index("Commands:")
    assert "/image PATH" in err and "/reset" in err
    assert "attached img.png (112x84 pixels, 12 image tokens)" in err
    assert "no such file" in err
    assert "unknown command /bogus" in err
    assert out.stdout.count("> ") >= 5  # the prompts; only the question went to the model


def test_a_failed_load_prints_no_greeting(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 32)
    out = _cli(["chat", "-m", str(bad)], tmp_path, stdin="")
    assert out.returncode == 1
    assert "Model loaded" not in out.stderr and "Type a message" not in out.stderr
