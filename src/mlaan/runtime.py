"""How a run uses the machine: which device, bf16 autocast, channels-last memory format, the CPU thread count,
and its peak memory (measured and shown).

Measured on the 2-core machines this project is developed on (BENCHMARKS.md, "CPU fast path"): channels-last
makes a ResNet-32 training step on one thread 0.80-0.86× as long (an Intel Xeon and an AMD EPYC); bf16 autocast
pays off only where the CPU has AMX tiles (the issue's measurement: 0.46× with channels-last), and is a little
*slower* with AVX512-BF16 alone. So ``--amp`` on a CPU is honoured wherever bf16 instructions exist, and
:func:`recommended_amp` says whether it is worth turning on. A multi-threaded OpenMP team stalls when another
process holds one of its cores, so the default thread count is the number of cores that are actually idle when the
run starts.
"""

from __future__ import annotations

import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class FastPath:
    """What a run uses: ``autocast_dtype`` (None: fp32), ``channels_last``, CPU ``threads`` (None: untouched),
    and ``bf16`` (the instructions that make bf16 work here, or None)."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    threads: int | None
    bf16: str | None

    def describe(self) -> str:
        """One line for the log, e.g. ``"fp32, channels_last, 1 thread"``."""
        precision = f"bf16 autocast ({self.bf16})" if self.autocast_dtype is not None else "fp32"
        parts = [precision, "channels_last" if self.channels_last else "contiguous (NCHW)"]
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'s' if self.threads != 1 else ''}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """Plain data for ``metrics.json``."""
        values = asdict(self)
        values["autocast_dtype"] = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None
        return values


def cpu_bf16() -> str | None:
    """The CPU's bf16 instructions: ``"AMX-BF16"``, ``"AVX512-BF16"``, or None when it has neither."""
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def bf16_support(device: torch.device) -> str | None:
    """Why bf16 autocast can run on ``device`` (a short name), or None where it cannot."""
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return cpu_bf16()
    return None


def recommended_amp(device: torch.device) -> bool:
    """Whether bf16 autocast is *faster* than fp32 on ``device``: on CUDA cards with bf16, and on CPUs with AMX
    tiles (AVX512-BF16 alone measured slower than fp32 with channels-last, see the module docstring)."""
    support = bf16_support(device)
    return support == "CUDA" or support == "AMX-BF16"


_BF16_CHECKED = False  # warn_slow_bf16 looks (and warns) once per process


def warn_slow_bf16(device_type: str, model_dtype: torch.dtype | None = None) -> None:
    """Warn once per process (RuntimeWarning) when a training step on ``device_type`` runs under bf16 autocast —
    the caller's own ``torch.autocast("cpu", torch.bfloat16)``, or ``model_dtype`` (a model's ``autocast_dtype``)
    — on a CPU without AVX512-BF16 or AMX-BF16 (:func:`cpu_bf16`): bf16 is emulated there, about 10x slower than
    fp32 (an AVX2-only AMD EPYC, issue 28). ``--amp`` is turned off on such a CPU with its own warning
    (:func:`resolve_fast_path`); this covers autocast that mlaan did not choose. Cheap after the first look."""
    global _BF16_CHECKED
    if _BF16_CHECKED or device_type != "cpu":
        return
    if model_dtype != torch.bfloat16 and not (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return
    _BF16_CHECKED = True
    if cpu_bf16() is None:
        warnings.warn("bf16 autocast on a CPU without AVX512-BF16 or AMX-BF16 instructions: bf16 is emulated "
                      "here, about 10x slower than fp32; train in fp32 (mlaan.runtime.recommended_amp(device) "
                      "says where bf16 pays off)", RuntimeWarning, stacklevel=4)


def fast_path_flags(device: torch.device) -> tuple[list[str], str]:
    """The ``mlaan train`` flags of the fastest measured path on ``device``, and why (one line for a log).

    Channels-last is already the CPU default, so only ``--amp`` is ever added."""
    support = bf16_support(device)
    if recommended_amp(device):
        return ["--amp"], f"fast path on {device.type}: bf16 autocast ({support})" + (
            " + channels_last" if device.type == "cpu" else "")
    if device.type == "cpu":
        why = "AVX512-BF16 without AMX measured slower than fp32" if support else "no bf16 instructions"
        return [], f"fast path on cpu: fp32 + channels_last (bf16 off: {why})"
    return [], f"{device.type}: fp32"


def free_cores(sample_seconds: float = 0.2) -> int:
    """How many of the cores this process may use were idle over the last ``sample_seconds`` (at least 1).

    Reads ``/proc/stat`` twice; where that is unavailable (not Linux), every usable core counts as free."""
    usable = _usable_cpus()
    before = _cpu_times()
    if before is None:
        return len(usable)
    time.sleep(sample_seconds)
    after = _cpu_times()
    idle_capacity = 0.0
    for cpu in usable:
        if cpu not in before or cpu not in after:
            continue
        (idle0, total0), (idle1, total1) = before[cpu], after[cpu]
        if total1 > total0:
            idle_capacity += (idle1 - idle0) / (total1 - total0)
    # a core counts as free when most of it is idle: 1.6 idle cores → 2, 1.3 → 1
    return max(1, min(len(usable), int(idle_capacity + 0.5)))


def max_threads() -> int:
    """The largest intra-op thread count taken: 256, or twice the logical CPUs of a larger machine."""
    return max(256, 2 * (os.cpu_count() or 1))


def choose_threads(requested: int | None, share: int = 1) -> int:
    """``requested`` when given (≥ 1); else torch's count when ``OMP_NUM_THREADS`` is set (the user chose);
    else the :func:`free_cores` divided among ``share`` processes (torchrun's local ranks). ValueError for a
    count below 1 or above :func:`max_threads` (OpenMP aborts the process when it cannot create the team)."""
    if requested is not None:
        if not 1 <= requested <= max_threads():
            raise ValueError(f"threads must be 1 to {max_threads()} (a team beyond that is a typo: this machine has "
                             f"{os.cpu_count()} logical CPUs), got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, free_cores() // max(1, share))


def resolve_fast_path(
    device: torch.device, amp: bool, channels_last: bool | None, threads: int | None, share: int = 1
) -> tuple[FastPath, list[str]]:
    """The run's :class:`FastPath` and any warnings to show (``--amp`` where bf16 cannot run).

    ``channels_last=None`` means: on for CPU runs (measured faster), off elsewhere (not measured here).
    ``threads`` applies to CPU runs; None picks the idle cores shared among ``share`` local processes
    (:func:`choose_threads`)."""
    warnings = []
    support = bf16_support(device)
    dtype = None
    if amp:
        if support is None:
            what = "this CPU has neither AVX512-BF16 nor AMX-BF16" if device.type == "cpu" else (
                f"{device.type} has no bf16 autocast here")
            warnings.append(f"--amp: {what}; training in fp32")
        else:
            dtype = torch.bfloat16
    if channels_last is None:
        channels_last = device.type == "cpu"
    cpu_threads = choose_threads(threads, share) if device.type == "cpu" else None
    cores = len(_usable_cpus())
    if cpu_threads is not None and cpu_threads * share > cores:
        warnings.append(f"--threads {cpu_threads} x {share} process(es) is more than the {cores} core(s) this "
                        "process may use: the OpenMP team will wait on itself (slower, not faster)")
    return FastPath(dtype, bool(channels_last), cpu_threads, support), warnings


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count (None leaves it as it is)."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------- device
def pick_device(device_arg: str = "auto", local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The device a process runs on, checked: ``"auto"`` (CUDA if available, else MPS for a single process, else
    CPU), ``"cpu"``, ``"cuda"``/``"cuda:N"`` or ``"mps"``. Under torchrun (``distributed``) a CUDA device is always
    ``cuda:LOCAL_RANK`` (a warning when another index was asked for).

    ValueError (one line, naming the choices) for an unknown or unsupported device, or one this machine lacks."""
    arg = (device_arg or "auto").strip().lower()
    if arg == "auto":
        if torch.cuda.is_available():
            arg = "cuda"
        elif not distributed and torch.backends.mps.is_available():
            arg = "mps"
        else:
            arg = "cpu"
    try:
        device = torch.device(arg)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device_arg!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device_arg!r} was asked for but CUDA is not available; use --device cpu")
        count = torch.cuda.device_count()
        if distributed:
            if device.index is not None and device.index != local_rank:
                warnings.warn(
                    f"under torchrun each process uses cuda:LOCAL_RANK; ignoring {device_arg!r} for cuda:{local_rank}",
                    stacklevel=3,
                )
            if local_rank >= count:
                raise ValueError(
                    f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s): start at most "
                    f"{count} processes per node (--nproc-per-node)"
                )
            return torch.device("cuda", local_rank)
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= count:
            raise ValueError(f"device {device_arg!r} does not exist: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if distributed:
            raise ValueError("MPS cannot be used with torchrun (no MPS process-group backend); use --device cpu")
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device_arg!r} was asked for but MPS is not available")
        return device
    if device.type != "cpu":
        raise ValueError(f"unsupported device {device_arg!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


# ------------------------------------------------------------------------------------------------- memory
def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA caching allocator's peak on CUDA (``"cuda_max_memory_allocated"``),
    the process's peak RSS elsewhere (``"cpu_peak_rss"``)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def format_bytes(n: float | None) -> str:
    """``n`` bytes for people: ``"512 B"``, ``"1.50 KiB"``, ``"2.00 MiB"``, up to GiB (``"1536.00 GiB"``);
    ``"—"`` for None (not measured)."""
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def plural(count: int, noun: str) -> str:
    """``"1 epoch"``, ``"2 epochs"``: a count with its noun, for lines people read."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


# ------------------------------------------------------------------------------------------------ helpers
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times() -> dict[int, tuple[int, int]] | None:
    """Per CPU: (idle + iowait jiffies, total jiffies), from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        numbers = [int(v) for v in values[:8]]
        times[int(name[3:])] = (numbers[3] + numbers[4], sum(numbers))
    return times
