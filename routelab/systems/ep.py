"""Expert-parallel load model: standard EP and Least-Loaded EP (LLEP) from a routing trace.

**Standard EP** (Nie et al. style; LLEP paper Alg. 1): ``P`` devices hold ``M = E/P``
contiguous experts each (expert e lives on device ``e // M``, or any placement given);
every (token, expert) assignment is sent to the expert's device by an all-to-all and back.
Under skew one device receives most of the batch.

**LLEP** (Salesforce, "Least-loaded expert parallelism", arXiv 2601.17111; code
``SalesforceAIResearch/LeastLoadedEP``, ``compute_llep_lpt_plan``): when the imbalance
ratio reaches ``λ``, experts are visited in decreasing load; an expert stays native while
its device has room under ``cap = α·floor(Σl / P)`` (after the loads still pending there),
and its excess tokens spill, in contiguous chunks of its sorted token list, to the devices
with the lowest effective load (assigned + pending). A chunk smaller than ``m`` is skipped
while more tokens remain; when no device qualifies the rest goes to the least-loaded one.
Every spill sends the expert's weights to the helper. The routing itself is unchanged.
As in the code, a partially native expert re-sorts the helpers after each chunk, an
expert spilled entirely takes the helpers in one sorted pass. Defaults (paper §5):
λ = 1.3, α = 1, m = 1024; the gate's ratio is max/mean of per-device loads (the code's
default) or of per-expert loads (the paper's text).

**Cost model** (per layer and step; LLEP paper Eqs. 3-4, with the constants of
``EPCostModel``): a device's compute is ``Σ_gemms (overhead + tokens · t_token)`` with
``t_token = 6·D·H / flops``; each all-to-all (dispatch, then combine) takes the largest
per-rank send or receive volume over the link; LLEP adds the expert weights each helper
receives. Tokens start spread evenly over the ranks in order (rank ``r`` holds tokens
``[r·T/P, (r+1)·T/P)``); assignments to the local rank move no bytes.
Oracle (hand-computed, tested): loads [80,0,10,10,0,0,0,0], P = 4, m = 1, α = 1 -> expert 0 on GPU0
[0,25), GPU2 [25,50), GPU3 [50,75), GPU1 [75,80); loads [25,25,25,25].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice, check_non_negative, check_positive_int


@dataclass(frozen=True)
class LLEPConfig:
    """LLEP parameters: imbalance gate ``lam`` (λ), capacity factor ``alpha`` (α), minimum
    GEMM size ``min_chunk`` (m), and which loads the gate compares (``gpu`` or ``expert``)."""

    lam: float = 1.3
    alpha: float = 1.0
    min_chunk: int = 1024
    gate: str = "gpu"

    def __post_init__(self) -> None:
        if not self.lam >= 1:
            raise ConfigError(f"lam (λ) must be >= 1, got {self.lam}.")
        if not self.alpha > 0:
            raise ConfigError(f"alpha (α) must be > 0, got {self.alpha}.")
        if self.min_chunk < 1:
            raise ConfigError(f"min_chunk (m) must be >= 1, got {self.min_chunk}.")
        check_choice("gate", self.gate, ("gpu", "expert"))


@dataclass(frozen=True)
class LLEPPlan:
    """Where each expert's tokens go.

    Attributes:
        chunks: expert -> ``[(device, start, end)]`` over the expert's sorted token list.
        device_loads: int ``[P]`` tokens (assignments) per device.
        weight_transfers: ``(expert, from_device, to_device)`` per spilled chunk.
        applied: False when the gate kept standard EP.
        imbalance: the ratio the gate compared with λ.
    """

    chunks: dict[int, list[tuple[int, int, int]]]
    device_loads: np.ndarray
    weight_transfers: list[tuple[int, int, int]]
    applied: bool
    imbalance: float


def contiguous_placement(num_experts: int, num_devices: int) -> np.ndarray:
    """Device of each expert when each device holds ``E/P`` consecutive experts."""
    if num_devices < 1 or num_experts % num_devices:
        raise ConfigError(
            f"num_experts={num_experts} must be a multiple of devices={num_devices} for a contiguous placement."
        )
    return np.arange(num_experts) // (num_experts // num_devices)


def imbalance_ratios(loads_E: np.ndarray, placement_E: np.ndarray, num_devices: int) -> tuple[float, float]:
    """``(expert-level max/mean, device-level max/mean)``; 1.0 when nothing is routed."""
    loads = np.asarray(loads_E, dtype=np.float64)
    device = np.bincount(placement_E, weights=loads, minlength=num_devices)
    expert_ratio = loads.max() / loads.mean() if loads.sum() > 0 else 1.0
    device_ratio = device.max() / device.mean() if device.sum() > 0 else 1.0
    return float(expert_ratio), float(device_ratio)


def standard_plan(loads_E: np.ndarray, placement_E: np.ndarray, num_devices: int, imbalance: float = 1.0) -> LLEPPlan:
    loads = np.asarray(loads_E, dtype=np.int64)
    chunks = {int(e): [(int(placement_E[e]), 0, int(loads[e]))] for e in np.flatnonzero(loads)}
    device = np.bincount(placement_E, weights=loads, minlength=num_devices).astype(np.int64)
    return LLEPPlan(chunks, device, [], False, imbalance)


def llep_plan(
    loads_E: np.ndarray, num_devices: int, config: LLEPConfig | None = None, placement_E: np.ndarray | None = None
) -> LLEPPlan:
    """The LLEP plan for per-expert loads ``loads_E`` (tokens·k per expert)."""
    config = config or LLEPConfig()
    loads = np.asarray(loads_E, dtype=np.int64)
    if loads.ndim != 1 or (loads < 0).any():
        raise InputError(f"loads_E must be a 1-D array of non-negative counts, got {loads}.")
    placement = contiguous_placement(len(loads), num_devices) if placement_E is None else np.asarray(placement_E)
    if placement.shape != loads.shape or placement.min(initial=0) < 0 or placement.max(initial=0) >= num_devices:
        raise ConfigError(f"placement must give a device in [0, {num_devices}) for each of the {len(loads)} experts.")
    expert_ratio, device_ratio = imbalance_ratios(loads, placement, num_devices)
    ratio = device_ratio if config.gate == "gpu" else expert_ratio
    if ratio < config.lam:
        return standard_plan(loads, placement, num_devices, ratio)
    total = int(loads.sum())
    balanced = total // num_devices
    cap = max(int(config.alpha * balanced) if balanced > 0 else total, 1)
    pending = np.bincount(placement, weights=loads, minlength=num_devices).astype(np.int64).tolist()
    assigned = [0] * num_devices
    chunks: dict[int, list[tuple[int, int, int]]] = {}
    transfers: list[tuple[int, int, int]] = []

    def others(native: int) -> list[int]:
        return sorted((g for g in range(num_devices) if g != native), key=lambda g: assigned[g] + pending[g])

    def give(expert: int, native: int, helper: int, start: int, count: int) -> None:
        chunks[expert].append((helper, start, start + count))
        assigned[helper] += count
        transfers.append((expert, native, helper))

    for expert in sorted(range(len(loads)), key=lambda e: -loads[e]):
        tokens = int(loads[expert])
        if tokens == 0:
            continue
        native = int(placement[expert])
        pending[native] -= tokens
        available = cap - assigned[native] - pending[native]
        chunks[expert] = []
        if available >= tokens:
            chunks[expert].append((native, 0, tokens))
            assigned[native] += tokens
            continue
        if available > 0:
            chunks[expert].append((native, 0, available))
            assigned[native] += available
            remaining, offset = tokens - available, available
            while remaining > 0:
                helpers = others(native)
                if not helpers:  # a single device: everything stays native
                    chunks[expert][0] = (native, 0, tokens)
                    assigned[native] += remaining
                    break
                for helper in helpers:
                    room = cap - assigned[helper] - pending[helper]
                    if room <= 0:
                        continue
                    count = min(remaining, room)
                    if count < config.min_chunk and remaining > count:
                        continue
                    give(expert, native, helper, offset, count)
                    offset, remaining = offset + count, remaining - count
                    break
                else:
                    give(expert, native, helpers[0], offset, remaining)
                    remaining = 0
            continue
        helpers = others(native)  # one sorted pass, as the reference code
        rooms = {g: cap - assigned[g] - pending[g] for g in helpers}
        remaining, offset = tokens, 0
        for helper in helpers:
            if remaining <= 0:
                break
            if rooms[helper] <= 0:
                continue
            count = min(remaining, rooms[helper])
            if count < config.min_chunk and remaining > count:
                continue
            give(expert, native, helper, offset, count)
            offset, remaining = offset + count, remaining - count
        if remaining > 0:
            if helpers:
                give(expert, native, helpers[0], offset, remaining)
            else:
                chunks[expert].append((native, 0, tokens))
                assigned[native] += tokens
    return LLEPPlan(chunks, np.array(assigned, dtype=np.int64), transfers, True, ratio)


@dataclass(frozen=True)
class EPCostModel:
    """Hardware constants of the step-time model.

    Defaults: the LLEP paper's setting, gpt-oss-120b experts (D = H = 2880, bf16, 50 MB of
    SwiGLU weights) on an 8-GPU H100-class node (400 TFLOP/s sustained, 200 GB/s effective
    NVLink all-to-all and peer-to-peer per rank, 20 µs per expert GEMM launch).

    Attributes:
        d_model, d_hidden: expert shape (SwiGLU: 3 matrices of ``D x H``).
        flops: sustained GEMM FLOP/s per device.
        gemm_overhead_s: fixed cost of one expert GEMM (launch, small-tile inefficiency).
        link_bandwidth: all-to-all bytes/s per rank (each direction).
        p2p_bandwidth: bytes/s for LLEP's expert-weight transfers.
        act_bytes, weight_bytes: bytes per activation / weight element.
    """

    d_model: int = 2880
    d_hidden: int = 2880
    flops: float = 400e12
    gemm_overhead_s: float = 20e-6
    link_bandwidth: float = 200e9
    p2p_bandwidth: float = 200e9
    act_bytes: int = 2
    weight_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "act_bytes", "weight_bytes"):
            check_positive_int(name, getattr(self, name))
        for name in ("flops", "link_bandwidth", "p2p_bandwidth"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}.")
        check_non_negative("gemm_overhead_s", self.gemm_overhead_s)

    @property
    def token_s(self) -> float:
        return 6.0 * self.d_model * self.d_hidden / self.flops

    @property
    def expert_weight_bytes(self) -> float:
        return 3.0 * self.d_model * self.d_hidden * self.weight_bytes


@dataclass(frozen=True)
class EPStep:
    """One layer-step under one plan: per-device loads, bytes per rank and time."""

    device_loads: np.ndarray
    send_bytes: np.ndarray
    recv_bytes: np.ndarray
    weight_bytes: np.ndarray
    compute_s: np.ndarray
    time_s: float


def step_cost(
    topk_idx_TK: np.ndarray, plan: LLEPPlan, num_devices: int, model: EPCostModel
) -> EPStep:
    """Time and traffic of one step of ``T`` tokens under ``plan``."""
    idx = np.asarray(topk_idx_TK)
    num_tokens = idx.shape[0]
    token_of = np.repeat(np.arange(num_tokens), idx.shape[1])
    flat = idx.reshape(-1)
    valid = flat >= 0
    experts, tokens = flat[valid], token_of[valid]
    order = np.lexsort((tokens, experts))  # each expert's tokens in token order
    experts, tokens = experts[order], tokens[order]
    source = np.minimum(tokens * num_devices // max(num_tokens, 1), num_devices - 1)
    dest = np.empty_like(experts)
    starts = np.searchsorted(experts, np.arange(int(experts.max(initial=-1)) + 1)) if len(experts) else np.zeros(0, int)
    compute = np.zeros(num_devices)
    for expert, pieces in plan.chunks.items():
        base = starts[expert]
        for device, lo, hi in pieces:
            dest[base + lo : base + hi] = device
            if hi > lo:
                compute[device] += model.gemm_overhead_s + (hi - lo) * model.token_s
    remote = source != dest
    traffic = np.zeros((num_devices, num_devices), dtype=np.int64)
    np.add.at(traffic, (source[remote], dest[remote]), 1)
    per_token = model.d_model * model.act_bytes
    send = traffic.sum(axis=1) * per_token
    recv = traffic.sum(axis=0) * per_token
    a2a = float(np.maximum(send, recv).max(initial=0)) / model.link_bandwidth
    weights = np.zeros(num_devices)
    for _, dst in {(e, d) for e, _, d in plan.weight_transfers}:
        weights[dst] += model.expert_weight_bytes
    transfer = float(weights.max(initial=0)) / model.p2p_bandwidth
    time = 2 * a2a + transfer + float(compute.max(initial=0))
    loads = np.bincount(dest, minlength=num_devices)
    return EPStep(loads, send.astype(float), recv.astype(float), weights, compute, time)


@dataclass(frozen=True)
class EPReport:
    """Standard EP vs LLEP over every layer and step of a trace.

    Per-step ratios are averaged over steps; ``speedup`` is total standard time over total
    LLEP time; bytes are means per rank and step (dispatch direction).
    """

    num_devices: int
    batch_tokens: int
    steps: int
    max_mean_load: float
    max_mean_load_llep: float
    time_s: float
    time_s_llep: float
    a2a_bytes_per_rank: float
    a2a_bytes_per_rank_llep: float
    weight_bytes_per_step_llep: float
    llep_applied_fraction: float
    device_loads: np.ndarray = field(repr=False)
    device_loads_llep: np.ndarray = field(repr=False)

    @property
    def speedup(self) -> float:
        return self.time_s / self.time_s_llep if self.time_s_llep > 0 else 1.0

    def as_dict(self) -> dict[str, float]:
        return {
            "devices": self.num_devices, "batch_tokens": self.batch_tokens, "steps": self.steps,
            "max_mean_load": self.max_mean_load, "max_mean_load_llep": self.max_mean_load_llep,
            "time_s": self.time_s, "time_s_llep": self.time_s_llep, "speedup": self.speedup,
            "a2a_bytes_per_rank": self.a2a_bytes_per_rank, "a2a_bytes_per_rank_llep": self.a2a_bytes_per_rank_llep,
            "weight_bytes_per_step_llep": self.weight_bytes_per_step_llep,
            "llep_applied_fraction": self.llep_applied_fraction,
        }


def default_devices(num_experts: int, preferred: int = 8) -> int:
    """The largest divisor of ``num_experts`` that is at most ``preferred``."""
    return max(d for d in range(1, min(preferred, num_experts) + 1) if num_experts % d == 0)


def simulate_ep(
    trace,  # noqa: ANN001 - TraceLike
    *,
    devices: int | None = None,
    batch_tokens: int = 16384,
    llep: LLEPConfig | None = None,
    model: EPCostModel | None = None,
    placement: Sequence[int] | None = None,
) -> EPReport:
    """Replay every layer of ``trace`` in steps of ``batch_tokens`` tokens under standard EP and LLEP."""
    num_experts = trace.num_experts
    devices = devices or default_devices(num_experts)
    if isinstance(batch_tokens, bool) or int(batch_tokens) < 1:
        raise ConfigError(f"batch_tokens must be a positive integer, got {batch_tokens!r}.")
    llep = llep or LLEPConfig()
    model = model or EPCostModel()
    place = contiguous_placement(num_experts, devices) if placement is None else np.asarray(placement)
    if place.shape != (num_experts,) or place.min() < 0 or place.max() >= devices:
        raise ConfigError(f"placement must give a device in [0, {devices}) for each of the {num_experts} experts.")
    ratios, ratios_llep, loads_std, loads_llep = [], [], [], []
    time_std = time_llep = bytes_std = bytes_llep = weight_llep = 0.0
    applied = steps = 0
    for layer in trace.layers:
        idx = trace.topk_idx(layer)
        for start in range(0, idx.shape[0], int(batch_tokens)):
            step_idx = idx[start : start + int(batch_tokens)]
            flat = step_idx[step_idx >= 0]
            loads = np.bincount(flat, minlength=num_experts)[:num_experts]
            if loads.sum() == 0:
                continue
            base = standard_plan(loads, place, devices)
            plan = llep_plan(loads, devices, llep, place)
            s, s_llep = step_cost(step_idx, base, devices, model), step_cost(step_idx, plan, devices, model)
            steps += 1
            applied += plan.applied
            ratios.append(s.device_loads.max() / s.device_loads.mean())
            ratios_llep.append(s_llep.device_loads.max() / s_llep.device_loads.mean())
            loads_std.append(s.device_loads)
            loads_llep.append(s_llep.device_loads)
            time_std += s.time_s
            time_llep += s_llep.time_s
            bytes_std += float(s.send_bytes.mean())
            bytes_llep += float(s_llep.send_bytes.mean())
            weight_llep += float(s_llep.weight_bytes.sum())
    if steps == 0:
        raise InputError("the trace routes no tokens; nothing to simulate.")
    return EPReport(
        devices, int(batch_tokens), steps, float(np.mean(ratios)), float(np.mean(ratios_llep)), time_std, time_llep,
        bytes_std / steps, bytes_llep / steps, weight_llep / steps, applied / steps,
        np.mean(loads_std, axis=0), np.mean(loads_llep, axis=0),
    )

