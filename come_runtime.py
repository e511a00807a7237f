"""What a come.py run needs beyond the method [OURS]: the cache folder and atomic writes, plans on disk, the
hidden-state cache on disk, accelerate's device_map offload, the host-side training state of --train-memory
offload, peak memory, and the memory plan that places the hidden-state cache and refuses a run that cannot fit
(docs/paper-scale.md).

Imports: come.py (the error class, logging, device helpers) and nothing else of the repository; come_eval.py and
come_cli.py import this module. come.py loads it only inside its opt-in paths (a disk cache, --train-memory offload).
Like come.py it needs only torch and transformers at import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from come import MKA_BLOCK_BYTES, MKA_TOKENS, ComeError, device_of, log, release_heap


def cache_root() -> Path:
    return Path(os.environ.get("COME_CACHE", Path.home() / ".cache" / "come"))


# ============================================================================ files: atomic folders and plans
PLAN_TENSORS = "come_plan.safetensors"     # --repair and replaceme: the refit weights of each step, next to the plan


def check_save_dir(path: str | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not Path(path).is_dir():
        raise ComeError(f"--save {path} exists and is not a directory")
    if path and Path(path).exists() and any(Path(path).iterdir()) and not overwrite:
        raise ComeError(f"--save {path} is not empty; pass --overwrite to replace it")


def write_folder(path: str, overwrite: bool, write) -> None:
    """Call write(tmp) on a temporary sibling folder, then rename it to `path`: an interruption leaves nothing.

    Replacing an existing folder takes two renames (the old one aside, the new one in); a process killed between
    them leaves the old folder aside, and the next write of the same path puts it back before it starts.
    """
    final = Path(path).resolve()
    recover_interrupted_write(final)
    check_save_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        tmp.mkdir()
        write(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_write(final: Path) -> None:
    """Clean up after a write_folder of `final` that a kill interrupted: its temporary folders go, and an old
    folder that was set aside comes back when nothing replaced it. Folders of a process still alive are left."""
    for leftover in sorted(final.parent.glob(f".{final.name}.*-*")):
        kind, _, pid = leftover.name.rpartition("-")
        if not pid.isdigit() or pid_alive(int(pid)) or not kind.endswith((".tmp", ".old")):
            continue
        if kind.endswith(".old") and not final.exists():
            leftover.rename(final)
            log(f"{final}: restored the folder an interrupted write had set aside")
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def progress_file(save: str) -> Path:
    """Where an unfinished run keeps its plan after every merge step (--resume): a hidden sibling of --save."""
    return Path(save).resolve().with_name(f".{Path(save).name}.progress") / "come_plan.json"


def write_plan(path: Path, plan: dict) -> None:
    """Write a plan atomically (refit tensors first): an interrupted write leaves the previous plan (--resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = plan["merge"].get("tensors")
    if tensors:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, path.with_name(PLAN_TENSORS + ".tmp"))
        os.replace(path.with_name(PLAN_TENSORS + ".tmp"), path.with_name(PLAN_TENSORS))
    plan = {**plan, "merge": {k: v for k, v in plan["merge"].items() if k != "tensors"}}
    path.with_suffix(".tmp").write_text(json.dumps(plan, indent=1))
    os.replace(path.with_suffix(".tmp"), path)


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (its nearest existing parent)."""
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk_space(folder: Path, needed: int) -> None:
    """Refuse, naming what would fit, when `needed` bytes of memory-mapped spill files do not fit under `folder`.

    Writing into a memory-mapped file on a full disk raises SIGBUS: the process would die without a message.
    """
    free = free_disk_bytes(folder)
    if needed > free:
        raise ComeError(f"the hidden-state cache on disk needs {needed / GIB:.1f} GiB under {folder}, which has "
                        f"{free / GIB:.1f} GiB free. What helps: COME_CACHE=DIR on a larger disk, fewer --nsamples or "
                        "a shorter --seqlen, or --cache host on a machine with the host memory for it")


def read_plan(path: str) -> dict:
    """A come_plan.json (with the refit weights stored next to it), checked for its format."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ComeError(f"cannot read plan {path}: {e}") from e
    if plan.get("format") != "come-plan/1":
        raise ComeError(f"{path} is not a come_plan.json written by come.py")
    if any(isinstance(v, dict) and "tensor" in v for step in plan["merge"]["steps"] for v in step.values()):
        tensors = Path(path).with_name(PLAN_TENSORS)        # refit weights (--repair, replaceme) next to the plan
        if not tensors.is_file():
            raise ComeError(f"{path} was made with --repair; its refit weights {tensors} are missing")
        from safetensors.torch import load_file
        plan["merge"]["tensors"] = load_file(tensors)
    return plan


def save_pruned(model, tokenizer, plan: dict, path: str, overwrite: bool, extra: dict | None = None) -> None:
    """Write model + tokenizer + come_plan.json (+ refit tensors, + extra JSON files) to `path`, never half-written."""
    tensors = plan["merge"].get("tensors")
    plan = {**plan, "merge": {k: v for k, v in plan["merge"].items() if k != "tensors"}}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if tensors:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / PLAN_TENSORS)
        for name, content in {"come_plan.json": plan, **(extra or {})}.items():
            (tmp / name).write_text(json.dumps(content, indent=1))
    write_folder(path, overwrite, write)


def read_progress(path: Path, identity: dict) -> dict | None:
    """The merge record of an interrupted run whose plan shares `identity` (model, settings, calibration: --resume)."""
    if not path.is_file():
        log(f"--resume: no unfinished run at {path.parent}; starting from the first step")
        return None
    plan = read_plan(str(path))
    if {k: plan.get(k) for k in identity} != json.loads(json.dumps(identity)):
        raise ComeError(f"the unfinished run in {path.parent} used other settings (model, method, calibration or "
                        "target); rerun it with the same arguments, or delete that folder to start over")
    log(f"--resume: replaying {len(plan['merge']['steps'])} finished steps from {path.parent}")
    return plan["merge"]


# ====================================================================== devices: device_map, offloaded training state
def disk_buffer(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like `like` in a memory-mapped file under the cache folder, unlinked at once:
    nothing is left behind, and the space is freed with the tensor (the hidden-state cache on disk)."""
    folder = cache_root() / "spill"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}-{time.perf_counter_ns()}.bin"
    t = torch.from_file(str(path), shared=True, size=like.numel(), dtype=like.dtype).view(like.shape)
    path.unlink()       # the mapping stays valid; the space is freed when the tensor is
    return t


def load_model(path: str, device: str, dtype: torch.dtype, offload: int = 0):
    """The model of a local folder or hub name on `device`; the last `offload` decoder layers stay on the host (on
    disk for a CPU run), loaded onto the device while they run (accelerate device_map; `materialized`)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()      # blocks this process cached (e.g. the pruning cache) are free for the teacher
    kwargs = {"device_map": device} if device != "cpu" else {}
    if offload:     # every top-level part on the device, the last `offload` layers away
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        n, away = len(meta.model.layers), "disk" if device == "cpu" else "cpu"
        device_map = {f"model.{k}": device for k, _ in meta.model.named_children() if k != "layers"}
        device_map |= {f"model.layers.{i}": away if i >= n - offload else device for i in range(n)}
        kwargs = {"device_map": device_map | {"lm_head": device}, "offload_folder": str(cache_root() / "offload")}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


class HostTraining:
    """sp --train-memory offload: the float32 training state of the trained layers `js` lives in host memory, and a
    layer's float32 weights are on the compute device only while it runs.

    Per layer the host holds its master weights and its gradients (one flat buffer each) and AdamW's two moments;
    the optimizer steps there (`opt`). `staged(j)` copies layer j's weights onto the device for a forward (or a
    forward and its backward, which come.distill_step runs layer by layer) and frees them after it. Every gradient
    leaves the device as soon as it is accumulated (a post-accumulate-grad hook copies it into the host buffer and
    drops it). So the device holds, of training state, one layer's float32 weights and one gradient at a time
    (`peak_device_bytes` counts them; on a CPU the staged weights are the master itself) whatever the number of
    trained layers, and the host 16 bytes per trained parameter (`host_bytes`). On a GPU the two flat buffers of a
    layer are page-locked by registering them at their exact size (no power-of-two rounding of CUDA's host
    allocator) and unregistered by `finish`.
    """

    def __init__(self, layers: nn.ModuleList, js: list[int], lr: float, weight_decay: float,
                 pin: bool | None = None):
        self.device, self.trained = device_of(layers[js[0]]), list(js)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.state, self.hooks, self.registered, masters = {}, [], [], []
        self.device_bytes = self.peak_device_bytes = self.host_bytes = 0
        for j in js:
            named = list(layers[j].named_parameters())
            total = sum(p.numel() for _, p in named)
            weights, grads = torch.empty(total, dtype=torch.float32), torch.zeros(total, dtype=torch.float32)
            if self.pin:
                for buf in (weights, grads):
                    self._register(buf)
            pairs, offset = [], 0
            for _, p in named:
                n = p.numel()
                master = nn.Parameter(weights[offset:offset + n].view_as(p).copy_(p.detach()))
                grad = grads[offset:offset + n].view_as(p)
                master.grad = grad
                p.data = torch.empty(0, dtype=torch.float32, device=self.device)    # released until staged
                p.requires_grad_(True)
                self.hooks.append(p.register_post_accumulate_grad_hook(functools.partial(self._offload_grad, grad)))
                pairs.append((p, master, grad))
                offset += n
            self.state[j] = pairs
            masters += [m for _, m, _ in pairs]
            self.host_bytes += total * 16       # master weights and gradients, AdamW's exp_avg and exp_avg_sq
        self.opt = torch.optim.AdamW(masters, lr=lr, weight_decay=weight_decay)
        self.opt.register_step_pre_hook(lambda *_: self.wait_for_grads())
        trim_host_heap()    # the layers' own float32 storage, freed above, goes back to the system

    def _register(self, buf: torch.Tensor) -> None:
        rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)
        if int(rc) != 0:
            raise ComeError(f"could not page-lock {buf.numel() * 4 / 2**30:.2f} GiB of host memory for the offloaded "
                            f"training state (CUDA error {int(rc)}); raise the memlock limit or train fewer layers on "
                            "the host (--train-memory checkpoint)")
        self.registered.append(buf)

    def _count(self, change: int) -> None:
        self.device_bytes += change
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def _offload_grad(self, host: torch.Tensor, param: torch.Tensor) -> None:
        self._count(param.grad.numel() * 4)
        host.copy_(param.grad, non_blocking=self.pin)
        param.grad = None
        self._count(-host.numel() * 4)

    @contextlib.contextmanager
    def staged(self, j: int):
        """Layer j's float32 weights on the device for the duration (nothing to do for a layer not held here)."""
        pairs = self.state.get(j, [])
        for p, master, _ in pairs:
            p.data = master.detach().to(self.device, non_blocking=self.pin)
        staged = sum(m.numel() for _, m, _ in pairs) * 4
        self._count(staged)
        try:
            yield
        finally:
            for p, _, _ in pairs:
                p.data = torch.empty(0, dtype=torch.float32, device=self.device)
            self._count(-staged)

    def wait_for_grads(self) -> None:
        """Before every step of `opt` (a pre-hook): every gradient copy has landed, and a zero_grad(set_to_none) has
        not detached the host buffers."""
        if self.pin and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for pairs in self.state.values():
            for _, master, grad in pairs:
                master.grad = grad

    def finish(self) -> None:
        """Plain float32 parameters on the device again, with the trained weights; hooks removed, memory unlocked."""
        log(f"offloaded training state {self.host_bytes / 2**20:,.1f} MiB on the host; on the device at most "
            f"{self.peak_device_bytes / 2**20:,.1f} MiB (one staged layer and one gradient)")
        for pairs in self.state.values():
            for p, master, _ in pairs:
                p.data = master.detach().to(self.device)
        for hook in self.hooks:
            hook.remove()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for buf in self.registered:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self.state, self.registered, self.opt = {}, [], None


def resolve_device(device: str) -> str:
    """The run's device, resolved once: "cuda" becomes "cuda:N" (N: the current GPU) and "cuda:N" is checked against
    the GPUs torch sees, so that every CUDA call after it (set_device, synchronize, peak memory, staged layers) names
    one indexed device. Without CUDA (a --dry-run for a GPU) "cuda" plans for "cuda:0"."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ComeError(f"--device {device} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return str(dev)
    if not torch.cuda.is_available():
        return f"cuda:{dev.index or 0}"
    count, index = torch.cuda.device_count(), torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ComeError(f"--device {device}: torch sees {count} GPU(s) here, cuda:0 .. cuda:{count - 1}")
    return f"cuda:{index}"


def distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device of this rank) under torchrun; (0, 1, device) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local = os.environ.get("LOCAL_RANK", "0")
    if device.startswith("cuda") and device != f"cuda:{local}":
        if device != "cuda":
            log(f"torchrun: --device {device} becomes cuda:{local} on local rank {local} (one GPU per process)")
        device = f"cuda:{local}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))     # nccl collectives use the current device
    if not torch.distributed.is_initialized():
        import datetime
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(hours=12))
    return torch.distributed.get_rank(), world, device


# ============================================================================ peak memory and versions
def versions() -> dict:
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}


_PEAK_BEFORE_RESET = [0.0]      # the process's peak RSS before the last reset_host_peak (GiB)
_HOST_PEAK_OWN = [False]        # whether the last reset_host_peak restarted the kernel's peak


def _hwm_gib() -> float:
    """The kernel's peak resident set size of this process (VmHWM; ru_maxrss where /proc is not Linux's)."""
    with contextlib.suppress(OSError, AttributeError):
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss_gib() -> float:
    """The process's peak RSS since it started (GiB), across any reset_host_peak."""
    return max(_PEAK_BEFORE_RESET[0], _hwm_gib())


def reset_host_peak() -> bool:
    """[OURS] Start a new host peak (Linux: `5` to /proc/self/clear_refs resets VmHWM), keeping the process's
    peak for peak_rss_gib. False where the system has no such reset (then a row's peak is the running peak)."""
    _PEAK_BEFORE_RESET[0] = peak_rss_gib()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _HOST_PEAK_OWN[0] = True
    except OSError:
        _HOST_PEAK_OWN[0] = False
    return _HOST_PEAK_OWN[0]


def trim_host_heap() -> None:
    """[OURS] Hand the memory the C allocator kept after freeing back to the system (glibc's malloc_trim), so that
    the next phase does not stack on it: after post-training (teacher, AdamW state, activations freed) the
    evaluation peaked 1.1 GiB higher without it on SmolLM2. Nothing where the C library has no malloc_trim."""
    gc.collect()
    release_heap()


def restart_peaks(device: str) -> tuple[float | None, dict[str, float] | None]:
    """[OURS] End a block of work (a phase, a --compare row): its peak host RSS since the last restart (None where
    the system cannot restart it) and, on CUDA, its GPU peaks; then hand freed heap memory back and restart both."""
    host = _hwm_gib() if _HOST_PEAK_OWN[0] else None
    gpu = gpu_peaks(device)     # read, then reset (and release the allocator's cache)
    trim_host_heap()
    reset_host_peak()
    return host, gpu


@contextlib.contextmanager
def row_peaks(device: str, into: dict):
    """[OURS] Peak host RSS and GPU memory of one block of work (a --compare row), written into `into`:
    peak_host_gib (since the block began where the system can reset it, else the process's running peak, and
    host_peak_scope says which) and, on CUDA, peak_gpu_reserved_gib / peak_gpu_allocated_gib."""
    restart_peaks(device)
    yield
    own, peaks = restart_peaks(device)
    into.update(peak_host_gib=round(own if own is not None else peak_rss_gib(), 3),
                host_peak_scope="row" if own is not None else "process so far")
    if peaks:
        into.update(peak_gpu_reserved_gib=peaks["reserved_gib"], peak_gpu_allocated_gib=peaks["allocated_gib"])


def gpu_peaks(device: str, reset: bool = True) -> dict[str, float] | None:
    """Peak reserved and allocated GPU memory (GiB) of `device` since the last reset; None off CUDA."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    peaks = {"reserved_gib": round(torch.cuda.max_memory_reserved(dev) / GIB, 3),
             "allocated_gib": round(torch.cuda.max_memory_allocated(dev) / GIB, 3)}
    if reset:       # the allocator's cache goes back at a phase boundary: the next phase's reserved peak is its own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "empty_host_cache"):
            torch.accelerator.empty_host_cache()        # pinned host blocks CUDA keeps cached (a pinned cache's)
    return peaks



# ============================================================================ memory plan
GIB = 2**30
# [OURS] sampling training text from the dense model (--train-data ...+self): the KV cache of one batch, its windows
SELF_KV_BYTES, SELF_BATCH = 2 << 30, 64
RUNTIME_GIB = 0.45      # resident python, torch, transformers, tokenizer and text before any weights (measured)
# on a CPU, the kernels' code and buffers that the first forward and loss page in, kept for the process's life
# (measured: 0.12 GiB on SmolLM2, 0.16 on the 7B slice)
CPU_KERNELS_GIB = 0.2
TRAINING_RESIDUE_GIB = 0.1  # host heap post-training leaves that malloc_trim does not return (0.04-0.12, 7B slice)
# The paper models' config.json values, so that --dry-run plans them offline.

PAPER_CONFIGS = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000,
                                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256,
                                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=32000,
                                   num_attention_heads=32, num_key_value_heads=8)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, vocab_size=152064,
                                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen3-4b": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True))}



CUDA_CONTEXT_GIB = 0.5      # GPU memory the CUDA context takes outside torch's allocator (typical, CUDA 12)
# host memory a GPU process holds for the CUDA runtime, driver and the kernel libraries torch loads (cuBLAS, cuDNN):
# a stated constant, typical of torch 2.x with CUDA 12, until the acceptance run measures it
CUDA_HOST_GIB = 1.0
ALLOCATOR_RESERVE = 0.05    # torch's caching allocator reserves more than it hands out (rounding, fragmentation)
LM_EVAL_GIB = 0.25        # lm-eval, datasets and the task manager, imported and loaded (measured 0.19)
TASK_ITEM_TOKENS = 2048     # longest lm-eval prompt + continuation planned for hub tasks (lm-eval truncates there)


def machine_budget(device: str, gpu_gib: float | None, host_gib: float | None, disk: Path | None = None) \
        -> dict[str, float]:
    """Bytes this run may use: --gpu-gib (less the CUDA context) / --host-gib, else what this machine has free now
    (the free GPU memory is measured after the context exists); `disk`: free bytes where spill files would go."""
    if not host_gib:    # MemAvailable counts reclaimable page cache; this process's own pages are ours too
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()) \
            if Path("/proc/meminfo").is_file() else {}
        free = int(info["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in info else \
            os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    host = host_gib * GIB if host_gib else free + RUNTIME_GIB * GIB
    budget = {"gpu": 0.0, "host": host, "disk": float(free_disk_bytes(disk)) if disk else float("inf")}
    if device.startswith("cuda") and gpu_gib:
        budget["gpu"] = (gpu_gib - CUDA_CONTEXT_GIB) * GIB
    elif device.startswith("cuda"):
        torch.cuda.empty_cache()        # cached blocks of this process are free to us
        budget["gpu"] = float(torch.cuda.mem_get_info(torch.device(device))[0])
    return budget


@functools.lru_cache(maxsize=16)
def parameter_counts(config_json: str) -> tuple[int, int, int]:
    """(parameters of the model, of one decoder layer, of its largest weight) from the config alone (meta device);
    cached, since a plan's search for placements asks for them many times."""
    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layer = meta.model.layers[0]
    return (sum(p.numel() for p in meta.parameters()), sum(p.numel() for p in layer.parameters()),
            max(p.numel() for p in layer.parameters()))


def kv_cache_bytes(config, tokens: int, itemsize: int) -> int:
    """Keys and values of every layer for `tokens` tokens of one sequence."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * itemsize


def sampling_batch(config, seqlen: int, itemsize: int, most: int = SELF_BATCH) -> int:
    """[OURS] Windows sampled at once for --train-data ...+self: as many as SELF_KV_BYTES of KV cache hold."""
    return max(1, min(most, SELF_KV_BYTES // kv_cache_bytes(config, seqlen, itemsize)))


def memory_plan(config, dtype: torch.dtype, device: str, windows: int, seqlen: int, target: int, cfg, tc,
                budget: dict[str, float], placement: str = "auto", mapped: bool = False, offload: int = 0,
                models: int = 1, tasks: tuple[int, int] | None = None, eval_while_pruning: bool = False,
                save_dtype: torch.dtype | None = None, latency=None) -> dict:
    """Peak GPU, host and disk memory of each phase from the config alone, and the placements that fit `budget`.

    prune: the weights and the hidden-state cache at every boundary, plus the largest transient: one window through
    one layer, the NLL chunk's logits, a merge (merged and candidate layer, concat_merge's float32 temporaries), a
    refit (float32 copy of the layer, float64 sums and solve), a scratch boundary for suffix passes through offloaded
    layers, and with `eval_while_pruning` (--compare) an evaluation. evaluate: the model and the larger of one
    perplexity window and lm-eval's batch of logits over the vocabulary (`tasks` = (batch size, tokens per item)).
    post_train: teacher, student, the fp32 weights + gradient + AdamW moments + foreach temporaries of the layers
    training at once (mp: one, sp: every merged layer), their saved activations, the teacher's boundary states, the
    KL chunk, and the cast to `save_dtype`. save: the serialized model in host memory (safetensors builds a shard in
    memory). GPU phases carry the allocator's reserve; the CUDA context is outside (machine_budget takes it off).
    `models`: copies of the weights alive while pruning (--compare and a standalone weightsum prune a copy).
    `offload`: decoder layers a device_map keeps on the host (disk on a CPU run); merged ones come onto the device.
    `mapped`: the weights are a memory-mapped checkpoint (CPU, same dtype): its pages stay resident while the model
    lives, replaced layers included; a merge is written over its first source's pages (private copies replace them
    one for one), so it adds none, and an offloaded trained layer comes back as new tensors beside its pages; an
    untied input embedding's rows are paged in as tokens occur (over a run's texts, most of them). One model for
    --dry-run, the cache placement (GPU, host, or memory-mapped disk) and the refusal to start a run that cannot
    finish; docs/paper-scale.md compares it with measured peaks.
    """
    e, d, f, V, L = dtype.itemsize, config.hidden_size, config.intermediate_size, config.vocab_size, \
        config.num_hidden_layers
    total, per_layer, biggest = parameter_counts(config.to_json_string())
    one_state, gpu, repair = windows * seqlen * d * e, device.startswith("cuda"), cfg.repair != "none"
    # one-shot drops scored from the weights or the gradients keep no hidden states (unless a repair reads them)
    no_cache = cfg.method in ("taylor", "taylor+", "magnitude", "magnitude+", "reverse") and not repair
    cache = (L + 1) * one_state * (2 if repair and cfg.repair_target == "dense" else 1) * (not no_cache) \
        * (min(MKA_TOKENS, seqlen) / seqlen if cfg.method == "mka" else 1)     # MKA caches its first tokens only
    weights = (total - offload * per_layer) * e
    # a merge is written into its first source layer (load_state_dict, copy_): on a mapped checkpoint its copy-on-write
    # pages replace the file's one for one, so it adds nothing; but merges of offloaded layers land on the device
    merged = min(offload, L - target) * per_layer * e
    away = offload * per_layer * e * gpu       # offloaded layers in host memory (on a CPU run: on disk)
    layer_activations = seqlen * (3 * f + 2 * d) * e
    nll_logits = 512 * V * 4 * 2
    evaluation = max(layer_activations + nll_logits, tasks[0] * tasks[1] * V * 2 * e if tasks else 0)
    if latency:     # --latency: a whole prompt's logits and activations; the generation batch's KV cache and logits
        evaluation = max(evaluation, latency.prompt * (V * e + 3 * f * e + 2 * d * e),     # the dense model: L layers
                         latency.gen_batch * kv_cache_bytes(config, latency.gen_prompt + latency.new, e)
                         + latency.gen_batch * V * 4 * 2)
    harness = LM_EVAL_GIB * GIB * bool(tasks)          # lm-eval's own host memory once tasks run
    suffix_passes = cfg.method == "come-p" or cfg.skip_score in ("merge", "sleb") or cfg.method in ("sleb", "laco",
                                                                                                    "ppl")
    # the calibration NLL of a candidate or a cut (CoMe reads none: its choices come from the cached states)
    reads_nll = cfg.method in ("come-p", "sleb", "ppl") or cfg.skip_score in ("merge", "sleb")
    transient = {"one layer's activations": layer_activations, "NLL logits": nll_logits * reads_nll,
                 # merged + candidate layer; concat_merge's largest weight: the result in fp32 (and the cast), plus
                 # fp32 copies of both sources when they are not fp32 or when norms are folded into them
                 "merge": (2 if cfg.method == "come-p" or cfg.skip_score == "merge" else 1) * per_layer * e
                 + biggest * (4 * (1 + 2 * (e != 4 or cfg.fold_norms)) + e * (e != 4)),
                 # refit: the float32 layer and its float32 state-dict copy; float64 G, the solve's matrix and its LU
                 # factor (d_ff x d_ff each; z^T z lives only while the sums run, before the solve), C, W_0, the
                 # right-hand side, its copy and the solution (d x d_ff each), one window's z, output and residual in
                 # float64; auto: the held-out window's G and C
                 "refit": repair * (per_layer * 8 * (e != 4) + (f * f * 3 + d * f * 5 + seqlen * (f + 3 * d)
                                    + (f * f + d * f) * 2 * (cfg.repair_alpha == "auto")) * 8),
                 "scratch boundary (offloaded suffix)": one_state * (offload > 0 and suffix_passes),
                 # taylor: every decoder weight's gradient, each layer's checkpointed input, one layer's activations
                 # recomputed in backward, and the logits with their log-softmax and gradient in float32
                 "calibration gradients": (L * per_layer * e + seqlen * (L * d + 12 * d + 6 * f) * e
                                           + seqlen * V * 4 * 3) * cfg.method.startswith("taylor"),
                 # streamline: the trained layer's float32 weights, gradients, AdamW moments, one window's activations
                 "replacement training": (per_layer * 16 + seqlen * (12 * d + 6 * f) * 4)
                 * (cfg.method == "streamline"),
                 # mka: one float64 token block of every window and a few windows x windows float64 matrices (Gram,
                 # distances, kernel, its normalizations, the SVD's factors)
                 "MKA distances": (MKA_BLOCK_BYTES + 8 * windows * windows * 8) * (cfg.method == "mka"),
                 "evaluation": evaluation * eval_while_pruning}
    phases, slack = {}, 1 + ALLOCATOR_RESERVE * gpu
    runtime = (RUNTIME_GIB + (CUDA_HOST_GIB if gpu else CPU_KERNELS_GIB)) * GIB
    for where in [placement] if placement != "auto" else (["gpu"] if gpu and not offload else []) + ["host", "disk"]:
        parts = {"weights": weights * models, "merged layers": merged, "offloaded layers": away,
                 f"hidden-state cache ({where})": cache if where != "disk" else one_state, **transient}
        peak = weights * models + merged + max(transient.values())
        cached = parts[f"hidden-state cache ({where})"]
        phases["prune"] = {"gpu": (peak + cached * (where == "gpu")) * gpu * slack,
                           "host": runtime + cached * (where != "gpu") + away + peak * (not gpu)
                           + harness * eval_while_pruning, "parts": parts,
                           "disk": cache * (where == "disk") + offload * per_layer * e * (not gpu)}
        if fits(phases["prune"], budget):
            break
    # the merged layers stay (and, on a mapped checkpoint, the replaced layers' pages)
    eval_parts = {"weights": weights, "merged layers": merged, "evaluation": evaluation}
    phases["evaluate"] = {"gpu": sum(eval_parts.values()) * gpu * slack, "parts": {**eval_parts, "lm-eval": harness},
                          "host": runtime + away + harness + sum(eval_parts.values()) * (not gpu)}
    student_params = total - (L - target) * per_layer
    if tc:
        n = target if tc.train_all else L - target          # trained layers (span-2 merges: one per removed layer)
        live, off = 1 if tc.mode == "mp" else n, tc.mode == "sp" and tc.memory == "offload"
        away_n = (n if tc.offload_count is None else min(tc.offload_count, n)) * off   # training state on the host
        # on the host per offloaded layer (HostTraining): float32 master weights and gradients (on a GPU run page-
        # locked by registration at their exact size) and the two AdamW moments
        host_state = per_layer * 16
        seqlen = tc.seqlen or seqlen                                  # the training window
        losses = n if tc.mode == "sp" and tc.targets == "merged" else 1     # loss positions of a step
        saved = tc.batch_size * seqlen * (12 * d + 6 * f) * 4        # one trained layer's saved activations
        student = weights if mapped else student_params * e - \
            max(offload - 2 * (L - target), 0) * per_layer * e      # offloaded layers no merge consumed
        # AdamW's sqrt(v): foreach over the device's trained layers on a GPU, for-loop per tensor on the CPU
        foreach_host = 3 * biggest * 4 if not gpu or away_n else 0
        foreach = (live - away_n) * per_layer * 4 * gpu + foreach_host
        cast = (save_dtype.itemsize - e) * student_params if save_dtype and save_dtype.itemsize > e else 0
        # the offloaded layers' own weights leave the student, except a mapped checkpoint's pages, which stay
        parts = {"teacher": weights, "student": student - away_n * per_layer * e * (not mapped),
                 "offloaded layers": 2 * away,
                 f"training state ({live - away_n} layer{'s' * (live - away_n != 1)})":
                     (live - away_n) * per_layer * (16 - e),
                 f"training state ({away_n} layer{'s' * (away_n != 1)}, on the host)": away_n * host_state,
                 "AdamW temporaries": foreach,
                 # the running offloaded layer's float32 weights (on a CPU: the host master itself) and the one
                 # gradient on its way to the host (HostTraining.peak_device_bytes)
                 "staged layer": (per_layer * 4 * gpu + biggest * 4) * (away_n > 0),
                 "activations": saved * (target if tc.mode == "sp" and tc.memory == "plain" else 1)
                 + target * tc.batch_size * seqlen * d * 4 * (tc.mode == "sp" and tc.memory != "plain"),
                 # the teacher's state entering the student and at every loss position (mp: a layer's in and out)
                 "teacher states": (3 if tc.mode == "mp" else losses + 1) * tc.batch_size * seqlen * d * e,
                 # each loss position's gradient (in the model's dtype), alive until the backward
                 "loss gradients": losses * tc.batch_size * seqlen * d * e,
                 # float32 chunk x vocabulary: both log-softmaxes and kl_div's three temporaries (measured)
                 "KL chunk": tc.kl_chunk * V * 4 * 5, "cast to --save-dtype": cast}
        on_host = away_n * host_state + 2 * away + foreach_host * (away_n > 0)
        during = sum(parts.values())
        if tc.sampled_text:     # [OURS] before training: teacher, student, the sampling batch's KV cache and logits
            sampling = sampling_batch(config, seqlen, e) * (kv_cache_bytes(config, seqlen, e) + 2 * V * 4)
            parts["sampling the training text (before training; peak = the larger)"] = sampling
            during = max(during, weights + parts["student"] + sampling)
        phases["post_train"] = {"gpu": (during - on_host) * gpu * slack, "parts": parts,
                                "host": runtime + (on_host if gpu else during)}
        # after training, an offloaded layer's weights are its float32 host master (HostTraining.finish), beside its
        # mapped pages; the optimizer steps every other trained layer in place
        fresh = away_n * per_layer * e * mapped
        residue = TRAINING_RESIDUE_GIB * GIB
        phases["evaluate post-trained"] = {**phases["evaluate"], "host": phases["evaluate"]["host"] + fresh + residue,
                                           "parts": {**phases["evaluate"]["parts"], "trained layers": fresh,
                                                     "heap left by training": residue}}
    saved_bytes = student_params * (save_dtype or dtype).itemsize
    save_parts = {"model": saved_bytes * (not gpu), "serialized copy": saved_bytes}
    phases["save"] = {"gpu": saved_bytes * gpu * slack, "parts": save_parts, "host": runtime + sum(save_parts.values())}
    gib = {k: {"gpu_gib": round(v["gpu"] / GIB, 2), "host_gib": round(v["host"] / GIB, 2),
               "disk_gib": round(v.get("disk", 0) / GIB, 2),
               "parts_bytes": {p: int(b) for p, b in v["parts"].items()}} for k, v in phases.items()}
    problems = [f"{phase} needs {v['gpu'] / GIB:.1f} GiB GPU, {v['host'] / GIB:.1f} GiB host"
                + (f" and {v['disk'] / GIB:.1f} GiB disk" if v.get("disk") else "") + ", more than the "
                f"{budget['gpu'] / GIB:.1f} GiB GPU, {budget['host'] / GIB:.1f} GiB host"
                + (f" and {budget.get('disk', 0) / GIB:.1f} GiB disk" if v.get("disk") else "") + " available"
                for phase, v in phases.items() if not fits(v, budget)]
    return {"memory": gib, "cache": where, "problems": problems,
            "budget_gib": {k: round(v / GIB, 2) for k, v in budget.items() if v != float("inf")}}


def place_run(config, dtype: torch.dtype, device: str, windows: int, seqlen: int, target: int, cfg, tc,
              budget: dict[str, float], placement: str = "auto", mapped: bool = False, offload: int | None = None,
              models: int = 1, tasks: tuple[int, int] | None = None, eval_while_pruning: bool = False, latency=None):
    """(the plan, tc with sp's training memory): the fewest offloaded decoder layers that make the GPU phases fit
    (`offload` fixes the number), then sp's first training memory that fits (plain, checkpoint, offload); a plan
    that still does not fit carries `hints`, what would make it fit."""
    save_dtype = getattr(torch, tc.save_dtype) if tc and tc.save_dtype else None
    chosen, layers = tc, offload or 0
    trained = (target if tc.train_all else config.num_hidden_layers - target) if tc else 0
    # [OURS] auto: every trained layer's state on the host when that fits; when the host is too small for all of
    # them, the most layers' state that the host holds (the rest train on the GPU, which keeps the most room)
    tries = [("plain", None), ("checkpoint", None), ("offload", None)] + \
        [("offload", k) for k in range(trained - 1, 0, -1)] if tc and tc.mode == "sp" and tc.memory == "auto" \
        else [(None, None)]
    while True:
        for memory, count in tries:
            chosen = dataclasses.replace(tc, memory=memory, offload_count=count) if memory else tc
            plan = memory_plan(config, dtype, device, windows, seqlen, target, cfg, chosen, budget, placement, mapped,
                               layers, models, tasks, eval_while_pruning, save_dtype, latency)
            if not plan["problems"]:
                break
        gpu_short = max(v["gpu_gib"] for v in plan["memory"].values()) * GIB > budget["gpu"]
        if not gpu_short or offload is not None or not device.startswith("cuda") or \
                layers >= config.num_hidden_layers - 1:
            break
        layers += 1
    plan.update(offload_layers=layers, train_memory=chosen.memory if chosen and chosen.mode == "sp" else None,
                train_offload_count=chosen.offload_count if chosen and chosen.memory == "offload" else None)
    if plan["problems"]:
        hints = []
        if chosen and chosen.mode == "sp":
            mp = memory_plan(config, dtype, device, windows, seqlen, target, cfg,
                             dataclasses.replace(chosen, mode="mp"), budget, placement)["memory"]["post_train"]
            hints.append(f"--post-train mp trains one merged layer at a time ({mp['gpu_gib']:.1f} GiB GPU, "
                         f"{mp['host_gib']:.1f} GiB host)")
            if chosen.train_all:        # fp32 weights, gradients and AdamW moments: 16 bytes a trained parameter
                merged, _ = place_run(config, dtype, device, windows, seqlen, target, cfg,
                                      dataclasses.replace(tc, train_all=False), budget, placement, mapped, offload,
                                      models, tasks, eval_while_pruning, latency)
                sp = merged["memory"]["post_train"]
                hints.append(f"--no-train-all trains the {config.num_hidden_layers - target} merged layers instead of "
                             f"all {target} ({sp['gpu_gib']:.1f} GiB GPU, {sp['host_gib']:.1f} GiB host): training "
                             "keeps 16 bytes a trained parameter (float32 weights, gradients, two AdamW moments)")
        hints += ["--dtype bfloat16 halves weights and states"] if dtype == torch.float32 else []
        hints += ["COME_CACHE=DIR on a disk with more free space"] if plan["cache"] == "disk" else []
        plan["hints"] = hints + ["fewer --nsamples, a shorter --seqlen or a smaller --batch-size shrink the "
                                 "calibration, activations and lm-eval's logits", "a machine with more memory"]
    return plan, chosen


def fits(phase: dict, budget: dict[str, float]) -> bool:
    return (not budget["gpu"] or phase["gpu"] <= budget["gpu"]) and phase["host"] <= budget["host"] and \
        phase.get("disk", 0) <= budget.get("disk", float("inf"))


def describe_memory(plan: dict, what: str) -> str:
    """The memory plan of memory_plan as the lines come.py prints."""
    budget = plan["budget_gib"]
    lines = [f"memory plan ({what}; budget {budget['gpu']:.1f} GiB GPU + {budget['host']:.1f} GiB host"
             + (f" + {budget['disk']:.1f} GiB disk" if "disk" in budget else "") + "; hidden-state "
             f"cache on {plan['cache']}" + (f"; sp training memory: {plan['train_memory']}" if plan.get("train_memory")
                                           else "")
             + (f" ({plan['train_offload_count']} trained layers' state on the host, the rest on the GPU)"
                if plan.get("train_offload_count") else "") + (f"; {plan['offload_layers']} layers offloaded"
                                                       if plan.get("offload_layers") else "") + "):"]
    for phase, v in plan["memory"].items():
        parts = sorted(((k, x) for k, x in v["parts_bytes"].items() if x), key=lambda kv: -kv[1])[:4]
        lines.append(f"  {phase:10s} GPU {v['gpu_gib']:7.2f} GiB  host {v['host_gib']:7.2f} GiB"
                     + (f"  disk {v['disk_gib']:.2f} GiB" if v.get("disk_gib") else "") + "  ("
                     + ", ".join(f"{k} {x / 2**30:.2f}" for k, x in parts) + ")")
    return "\n".join(lines + [f"  does not fit: {p}" for p in plan["problems"]] +
                     ([f"  what helps: {'; '.join(plan['hints'])}"] if plan["problems"] else []))
