"""Inference energy read from a hardware counter, or "not measured" — never an estimate (for the benchmarks).

Two counters are read, both cumulative energy totals kept by the hardware:

* **NVML** (NVIDIA GPUs, through the `nvidia-ml-py` bindings, module `pynvml`):
  `nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver was loaded (Volta and newer).
* **RAPL** (Intel, and AMD on recent Linux kernels, through `/sys/class/powercap`): each package zone's
  `energy_uj`, microjoules, which wraps around at the zone's `max_energy_range_uj`. Only the top-level
  package zones (`intel-rapl:0`, `intel-rapl:1`, ...) are summed; their sub-zones (core, uncore, dram)
  are parts of the package and would count twice. Reading `energy_uj` usually needs root.

[`find_counter`] picks the counter for a device, or gives the reason why none is usable; [`measure_energy`]
runs a function between two readings and reports joules per 1,000 samples. Where no counter exists the
result carries `joules=None` and the reason, so a report can say "not measured".

Counters measure the whole device (package or GPU), including other processes: measure on an otherwise
idle machine, and repeat.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EnergyCounter", "EnergyReading", "NvmlCounter", "RaplCounter", "find_counter", "measure_energy"]

POWERCAP_ROOT = Path("/sys/class/powercap")


class EnergyCounter:
    """A cumulative hardware energy counter. Subclasses implement `read()` (joules, monotonic except for wraps
    handled by `delta`)."""

    source: str = ""

    def read(self) -> Any:
        raise NotImplementedError

    def delta(self, before: Any, after: Any) -> float:
        """Joules between two readings."""
        raise NotImplementedError


class RaplCounter(EnergyCounter):
    """The sum of the RAPL package zones under a powercap folder, with wrap-around.

    Args:
        root (`Path`, defaults to `/sys/class/powercap`): the powercap folder (a fake one in tests).

    Raises:
        `RuntimeError`: no readable package zone under `root` (the message says why).
    """

    source = "RAPL"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(POWERCAP_ROOT if root is None else root)
        zones = sorted(p for p in self.root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not zones:
            raise RuntimeError(f"no RAPL package zone (intel-rapl:N) under {self.root}: this machine exposes no RAPL counter")
        self.zones: list[tuple[Path, int]] = []
        for zone in zones:
            energy = zone / "energy_uj"
            try:
                int(energy.read_text())
                max_range = int((zone / "max_energy_range_uj").read_text())
            except PermissionError:
                raise RuntimeError(f"{energy} is not readable by this user (RAPL usually needs root)") from None
            except (OSError, ValueError) as error:
                raise RuntimeError(f"cannot read the RAPL zone {zone}: {error}") from None
            self.zones.append((energy, max_range))
        self.source = f"RAPL ({len(self.zones)} package zone{'s' if len(self.zones) > 1 else ''})"

    def read(self) -> list[int]:
        return [int(energy.read_text()) for energy, _ in self.zones]

    def delta(self, before: list[int], after: list[int]) -> float:
        total_uj = 0
        for (_, max_range), a, b in zip(self.zones, before, after):
            # The counter restarts from 0 after max_energy_range_uj; at most one wrap per reading interval.
            total_uj += b - a if b >= a else b + max_range - a
        return total_uj / 1e6


class NvmlCounter(EnergyCounter):
    """The NVML total-energy counter of one NVIDIA GPU.

    Args:
        index (`int`, defaults to 0): the GPU index as NVML numbers them.
        module (*optional*): the NVML bindings module; defaults to importing `pynvml` (from `nvidia-ml-py`).

    Raises:
        `RuntimeError`: the bindings are missing, NVML cannot start, or the GPU has no energy counter.
    """

    source = "NVML"

    def __init__(self, index: int = 0, module: Any = None):
        if module is None:
            try:
                module = importlib.import_module("pynvml")
            except ImportError:
                raise RuntimeError("the NVML bindings are not installed: run `pip install nvidia-ml-py`") from None
        self.nvml = module
        try:
            module.nvmlInit()
            self.handle = module.nvmlDeviceGetHandleByIndex(index)
            module.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as error:  # NVMLError subclasses: no driver, no GPU, counter not supported
            raise RuntimeError(f"NVML energy counter unavailable on GPU {index}: {error}") from None
        self.source = f"NVML (GPU {index})"

    def read(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def delta(self, before: int, after: int) -> float:
        return (after - before) / 1e3  # millijoules


def find_counter(device: str = "cpu", *, powercap_root: str | Path | None = None, nvml_module: Any = None):
    """The hardware energy counter for `device`, or why there is none.

    Args:
        device (`str`, defaults to `"cpu"`): `"cpu"` (RAPL) or `"cuda"` / `"cuda:N"` (NVML on GPU N).
        powercap_root, nvml_module: where to look (for tests); see [`RaplCounter`] and [`NvmlCounter`].

    Returns:
        `tuple[EnergyCounter | None, str]`: the counter and `""`, or `None` and the reason.
    """
    device = str(device)
    try:
        if device.startswith("cuda"):
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            return NvmlCounter(index, module=nvml_module), ""
        if device == "cpu":
            return RaplCounter(POWERCAP_ROOT if powercap_root is None else powercap_root), ""
    except RuntimeError as error:
        return None, str(error)
    return None, f"no energy counter is known for device {device!r} (only cpu via RAPL and cuda via NVML)"


@dataclass(frozen=True)
class EnergyReading:
    """Energy of one measured run.

    Attributes:
        joules (`float` or `None`): energy between the two counter readings; `None` = not measured.
        samples (`int`): samples processed by the run.
        seconds (`float`): wall time of the run.
        source (`str`): the counter (`"RAPL (...)"`, `"NVML (GPU 0)"`), or `""`.
        reason (`str`): why it was not measured (empty when it was).
    """

    joules: float | None
    samples: int
    seconds: float
    source: str = ""
    reason: str = ""

    @property
    def joules_per_1000(self) -> float | None:
        """Joules per 1,000 samples, or `None` when not measured."""
        if self.joules is None or self.samples <= 0:
            return None
        return self.joules * 1000 / self.samples

    def describe(self) -> str:
        """`"12.3 J / 1,000 samples (RAPL ...)"` or `"not measured: <reason>"`."""
        if self.joules is None:
            return f"not measured: {self.reason}"
        return f"{self.joules_per_1000:.4g} J / 1,000 samples ({self.source})"

    def to_dict(self) -> dict:
        return {
            "joules": self.joules,
            "joules_per_1000": self.joules_per_1000,
            "samples": self.samples,
            "seconds": self.seconds,
            "source": self.source,
            "reason": self.reason,
        }


def measure_energy(
    run: Callable[[], Any], samples: int, *, device: str = "cpu", counter: EnergyCounter | None = None
) -> tuple[Any, EnergyReading]:
    """Call `run()` between two readings of the device's energy counter.

    On a GPU, synchronise inside `run` (or return only after the work is done), or the counter misses the
    queued kernels. The result is the device's total energy over the run, other processes included.

    Args:
        run (`Callable[[], Any]`): the inference to measure (e.g. an evaluation over `samples` rows).
        samples (`int`): how many samples `run` processes (the 1,000-sample figure is per these).
        device (`str`, defaults to `"cpu"`): picks the counter with [`find_counter`] unless `counter` is given.
        counter ([`EnergyCounter`], *optional*): a counter to use.

    Returns:
        `tuple[Any, EnergyReading]`: what `run` returned, and the reading (`joules=None` with the reason
        where no counter exists: "not measured", never an estimate).
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1 (the samples the run processes), got {samples}")
    reason = ""
    if counter is None:
        counter, reason = find_counter(device)
    before = counter.read() if counter is not None else None
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    if counter is None:
        return result, EnergyReading(None, samples, seconds, "", reason)
    joules = counter.delta(before, counter.read())
    return result, EnergyReading(joules, samples, seconds, counter.source, "")
