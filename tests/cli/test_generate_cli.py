"""`swaserve generate` and `swaserve model init`, run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from services.engine.models.loader import load_model
from services.models.model_store import resolve_model
from tests.engine.reference_model import greedy_generate
from tests.engine.tiny_models import reference_logits


def swaserve(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "swaserve", *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"swaserve {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return resolve_model("mimo-tiny")


def test_generate_ids_and_logits_match_the_model(tiny_dir, tmp_path):
    logits_file = tmp_path / "logits.npy"
    prompt = [9707, 11, 1879, 0, 42, 7]
    out = swaserve("generate", "--model", str(tiny_dir), "--prompt-ids", " ".join(map(str, prompt)),
                   "--max-tokens", "6", "--greedy", "--ids", "--dump-logits", str(logits_file))
    ids = [int(t) for t in out.stdout.split()]
    model = load_model(tiny_dir)
    assert ids == greedy_generate(model, [prompt], 6)[0]
    dumped = torch.from_numpy(np.load(logits_file))
    ref = reference_logits(model, prompt)[-1]
    assert float((dumped - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_generate_text_prints_a_continuation(tiny_dir):
    out = swaserve("generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "4", "--greedy")
    assert out.stdout.strip()
    assert "4 generated" in out.stderr


def test_smollm2_answers_a_real_question():
    out = swaserve("generate", "--model", "smollm2", "--chat", "--greedy", "--max-tokens", "16",
                   "--prompt", "What is the capital of France?")
    assert "Paris" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1 two 3"], "--prompt-ids must be integers"),
        (["--prompt-ids", "1 2", "--max-tokens", "0"], "max_tokens must be >= 1"),
        (["--prompt-ids", "1 2", "--top-p", "2"], "top_p"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tiny_dir, args, message):
    proc = swaserve("generate", "--model", str(tiny_dir), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_name_lists_the_known_ones():
    proc = swaserve("generate", "--model", "no-such-model", "--prompt", "x", check=False)
    assert proc.returncode == 2 and "mimo-tiny" in proc.stderr


def test_model_init_writes_a_loadable_checkpoint(tmp_path):
    out_dir = tmp_path / "m"
    swaserve("model", "init", "--out", str(out_dir), "--preset", "mimo-tiny", "--seed", "3")
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] == "mimo_v2_flash" and cfg["sliding_window_size"] == 128
    model = load_model(out_dir)
    assert model.config.window == 128
