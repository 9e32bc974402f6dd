"""Max-Sliced Wasserstein distance between two point clouds (pure torch).

The 1-D Wasserstein-2 distance between two equal-size empirical distributions has a closed form:
sort both projected samples and compare them rank by rank. The max-sliced distance is the largest
of those 1-D distances over unit directions ``theta``:

    MSW(x, y) = sqrt(max_theta mean_i (sort(x @ theta)_i - sort(y @ theta)_i) ** 2)

Finding the maximising direction is the expensive part. Two searches are offered:

* ``"random"``: the maximum over ``num_projections`` fresh random unit directions. This is what the
  LaCoOT paper's code does (through POT's ``max_sliced_wasserstein_distance``).
* ``"refine"``: the best of the random directions (and of the directions remembered from earlier
  calls, see [`DirectionSearch`]) is improved by a few fixed-point steps on detached features.
  For a fixed rank pairing the objective is the Rayleigh quotient of ``D^T D`` with
  ``D = sort-paired(x) - sort-paired(y)``, so each step is one power-iteration step
  ``theta <- normalise(D^T D theta)`` followed by a re-sort. The best direction seen is kept, so
  the estimate is never below the random one.

Whatever the search, the direction is chosen without gradients and the distance is then computed
once, differentiably, along the chosen direction: the gradient equals the (sub)gradient of the max.
"""

from __future__ import annotations

import zlib

import torch

__all__ = ["DirectionSearch", "max_sliced_wasserstein", "sliced_w2_squared"]

SEARCH_MODES = ("random", "refine")
# How a distance is put on a common scale across layers: raw, or relative to the RMS of the layer's input tokens.
NORMALIZATIONS = ("none", "input_rms")


def _check_clouds(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"point clouds must be 2-D tensors of shape (n, d); got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"point clouds must have the same width d: x has d={x.shape[1]}, y has d={y.shape[1]}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"point clouds must have the same number of points: x has {x.shape[0]}, y has {y.shape[0]}"
        )
    if x.shape[0] == 0:
        raise ValueError("point clouds are empty: there is no point to compare (check the attention mask)")


def random_directions(
    d: int, k: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return a (d, k) float32 matrix of independent unit directions, uniform on the sphere."""
    if k < 1:
        raise ValueError(f"the number of projections must be at least 1, got {k}")
    gen_device = generator.device if generator is not None else device
    theta = torch.randn(d, k, generator=generator, device=gen_device, dtype=torch.float32)
    theta = theta.to(device) if device is not None else theta
    return theta / theta.norm(dim=0, keepdim=True).clamp_min(1e-12)


def sliced_w2_squared(x: torch.Tensor, y: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Squared 1-D Wasserstein-2 distance of ``x`` and ``y`` along each column of ``projections``.

    Args:
        x, y (`torch.Tensor` of shape `(n, d)`): the two point clouds, equal size.
        projections (`torch.Tensor` of shape `(d, k)`): unit directions, one per column.

    Returns:
        `torch.Tensor` of shape `(k,)`.
    """
    px = torch.sort(x @ projections, dim=0).values
    py = torch.sort(y @ projections, dim=0).values
    return (px - py).pow(2).mean(dim=0)


def _w2_squared_along(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    # One direction as a 1-D vector: matrix-vector products are several times faster than (n, d) @ (d, 1).
    px = torch.sort(x @ theta).values
    py = torch.sort(y @ theta).values
    return (px - py).pow(2).mean()


def _w2_along(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """W2 (not squared) along one direction, finite whenever the projected differences are.

    The rank-paired differences are divided by a power of two near their largest magnitude before squaring
    (and the root multiplied back): squares of float32 values above ~1.8e19 would overflow to inf, and
    scaling by a power of two is exact, so for ordinary values the result is bit-identical to
    `sqrt(mean(diff**2))`.
    """
    diff = torch.sort(x @ theta).values - torch.sort(y @ theta).values
    largest = diff.detach().abs().amax()
    _, exponent = torch.frexp(torch.where(torch.isfinite(largest), largest, torch.ones_like(largest)))
    scale = torch.ldexp(torch.ones_like(largest), exponent)
    return scale * _safe_sqrt((diff / scale).pow(2).mean())


def _safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite slope at 0: identical clouds must give 0 with a zero (not NaN) gradient.
    # NaN must stay NaN (not be mapped to 0) so that a broken layer is noticed.
    zero = value == 0
    return torch.where(zero, torch.zeros_like(value), value.clamp_min(torch.finfo(value.dtype).tiny).sqrt())


def _refine(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, best: torch.Tensor, steps: int):
    """Power-iteration refinement of one direction on detached clouds; returns the best (theta, w2²).

    With the rank pairing of the current direction, D = x[ix] - y[iy] and the step is D^T (D theta).
    D theta is the difference of the two sorted projections, r; D^T r = x^T r_x - y^T r_y where r_x, r_y
    put r back in the points' own order, so no (n, d) gathered copy is needed. The best direction is kept
    with `torch.where`, not a Python `if`, so that a GPU never waits for the host inside the search.
    """
    current = theta
    for _ in range(steps):
        px, ix = torch.sort(x @ current)
        py, iy = torch.sort(y @ current)
        r = px - py
        step = x.T @ torch.empty_like(r).scatter_(0, ix, r) - y.T @ torch.empty_like(r).scatter_(0, iy, r)
        norm = step.norm()
        # a zero or non-finite step (identical clouds, NaN input) leaves the direction where it is
        usable = torch.isfinite(norm) & (norm > 0)
        current = torch.where(usable, step / torch.where(usable, norm, torch.ones_like(norm)), current)
        value = _w2_squared_along(x, y, current)
        better = value > best
        theta = torch.where(better, current, theta)
        best = torch.where(better, value, best)
    return theta, best


class DirectionSearch:
    """Chooses the slicing direction for [`max_sliced_wasserstein`], and remembers good ones.

    One instance serves many layers: pass a ``key`` (e.g. the layer index) and the best direction
    found for that key is offered again as a candidate next time (``keep_directions=True``), which
    turns a training run into a slowly improving search at no extra cost.

    Args:
        num_projections (`int`, defaults to 16): fresh random unit directions per call. With `"refine"`, 16
            plus the kept direction reach the long-search maximum (see `benchmarks/msw_directions.py`); the
            paper's random search used 50.
        mode (`str`, defaults to `"refine"`): `"random"` (max over the random directions, as in the
            paper's code) or `"refine"` (then improve the best one with power-iteration steps).
        refine_steps (`int`, defaults to 2): refinement steps (mode `"refine"`); with a kept direction, 2 reach
            0.998-0.999 of a long search on MiniLM and SmolLM2 (`benchmarks/msw_directions.py`).
        keep_directions (`bool`, defaults to `True`): remember the best direction per key.
        search_tokens (`int`, *optional*, defaults to 512): search on a random subset of at most this many
            points (the same rows of both clouds); `None` searches on all points. Sorting the `n x k`
            projections dominates the cost, and the direction only has to be good, not exact: the
            distance itself is then computed on all points along the chosen direction.
        seed (`int`, *optional*): seed of the private random generator (per device) for the directions.
        generator_per_key (`bool`, defaults to `False`): with a `seed`, draw each key's directions from a generator of
            its own (seeded from `seed` and the key), so that a layer's directions do not depend on the order in which
            layers are searched: scoring layer by layer then draws what a whole-model pass draws.
    """

    def __init__(
        self,
        num_projections: int = 16,
        mode: str = "refine",
        refine_steps: int = 2,
        keep_directions: bool = True,
        search_tokens: int | None = 512,
        seed: int | None = None,
        generator_per_key: bool = False,
    ):
        if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
            raise ValueError(f"num_projections must be at least 1, a whole number of directions, got {num_projections!r}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown direction search {mode!r}: choose one of {', '.join(SEARCH_MODES)}")
        if refine_steps < 0:
            raise ValueError(f"refine_steps must be 0 or more, got {refine_steps}")
        self.num_projections = num_projections
        self.mode = mode
        self.refine_steps = refine_steps
        if search_tokens is not None and search_tokens < 2:
            raise ValueError(f"search_tokens must be at least 2 (or None for all points), got {search_tokens}")
        self.keep_directions = keep_directions
        self.search_tokens = search_tokens
        self.seed = seed
        self.generator_per_key = generator_per_key
        self._generators: dict[str, torch.Generator] = {}
        self._kept: dict[object, torch.Tensor] = {}

    def _generator(self, device: torch.device, key: object) -> torch.Generator | None:
        if self.seed is None:
            return None
        name = f"{device}/{key}" if self.generator_per_key else str(device)
        if name not in self._generators:
            seed = zlib.crc32(f"{self.seed}/{key}".encode()) if self.generator_per_key else self.seed
            self._generators[name] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[name]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, key: object = None) -> torch.Tensor:
        """Return the chosen unit direction (shape `(d,)`, float32) for detached clouds ``x`` and ``y``."""
        x = x.detach().float()
        y = y.detach().float()
        generator = self._generator(x.device, key)
        if self.search_tokens is not None and x.shape[0] > self.search_tokens:
            rows = torch.randperm(x.shape[0], generator=generator, device=generator.device if generator else x.device)
            rows = rows[: self.search_tokens].to(x.device)
            x, y = x[rows], y[rows]
        candidates = random_directions(x.shape[1], self.num_projections, device=x.device, generator=generator)
        kept = self._kept.get(key) if self.keep_directions else None
        if kept is not None and kept.shape[0] == x.shape[1]:
            candidates = torch.cat([kept.to(x.device)[:, None], candidates], dim=1)
        values = sliced_w2_squared(x, y, candidates)
        best_index = torch.argmax(values)  # stays on the device: no host sync
        theta, best = candidates.index_select(1, best_index[None])[:, 0], values[best_index]
        if self.mode == "refine" and self.refine_steps > 0:
            theta, best = _refine(x, y, theta, best, self.refine_steps)
        if self.keep_directions:
            self._kept[key] = theta
        return theta

    def forget(self) -> None:
        """Drop every remembered direction."""
        self._kept.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The search's state as named tensors (for a checkpoint): the kept directions (`kept/<key>`) and the
        states of the private generators (`generator/<device>`, or `generator/<device>/<key>` per key). Keys must be
        strings to be saved."""
        state = {f"kept/{key}": theta.detach().cpu().contiguous() for key, theta in self._kept.items()}
        state.update({f"generator/{device}": g.get_state() for device, g in self._generators.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what [`state_dict`] returned: a resumed run then draws the same directions as an
        uninterrupted one."""
        self._kept = {name[len("kept/"):]: t.clone() for name, t in state.items() if name.startswith("kept/")}
        self._generators = {}
        for name, t in state.items():
            if name.startswith("generator/"):
                stored = name[len("generator/"):]  # "<device>", or "<device>/<key>" with generator_per_key
                generator = torch.Generator(device=stored.split("/", 1)[0])
                generator.set_state(t.clone())
                self._generators[stored] = generator


def max_sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    projections: torch.Tensor | None = None,
    num_projections: int = 64,
    search: str | DirectionSearch = "refine",
    key: object = None,
) -> torch.Tensor:
    """Max-Sliced Wasserstein-2 distance between two equal-size point clouds.

    The result is differentiable with respect to both ``x`` and ``y``, exactly 0 for identical
    clouds (with a zero gradient), and computed in float32 even under bf16/fp16 autocast.

    Args:
        x, y (`torch.Tensor` of shape `(n, d)`):
            The two point clouds (e.g. the non-padding tokens of a layer's input and output).
        projections (`torch.Tensor` of shape `(d, k)`, *optional*):
            Explicit unit directions. The maximum is taken over exactly these columns, which makes the
            result equal to POT's ``ot.sliced.max_sliced_wasserstein_distance(x, y, projections=projections, p=2)``.
        num_projections (`int`, defaults to 64):
            Random directions per call when ``search`` is a mode name.
        search (`str` or [`DirectionSearch`], defaults to `"refine"`):
            `"random"`, `"refine"` (see the module docstring), or a `DirectionSearch` instance that
            keeps its state (remembered directions, seeded generator) across calls.
        key (*optional*): the name under which a `DirectionSearch` remembers its best direction.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    _check_clouds(x, y)
    device_type = x.device.type if x.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        xf, yf = x.float(), y.float()
        if projections is not None:
            if projections.dim() != 2 or projections.shape[0] != x.shape[1] or projections.shape[1] == 0:
                raise ValueError(
                    f"projections must have shape (d, k) with d={x.shape[1]} and k >= 1; got {tuple(projections.shape)}"
                )
            with torch.no_grad():
                values = sliced_w2_squared(xf.detach(), yf.detach(), projections.to(xf))
            theta = projections.to(xf).index_select(1, torch.argmax(values)[None])[:, 0]
        else:
            if isinstance(search, str):
                search = DirectionSearch(
                    num_projections=num_projections, mode=search, keep_directions=False, search_tokens=None
                )
            theta = search(xf, yf, key=key)
        return _w2_along(xf, yf, theta.detach())

