"""The claims: what each paper says, which runs test it and how.

Each claim has one or more checks. A check names a metric (a column of
``routelab.lab.claims.measures``), the arm it is about, the reference (a baseline arm,
paired by seed, or a fixed threshold), the test kind (``routelab.lab.claims.verdict``) and
the paper's own number. Margins for "equal" and "at most a little worse" are in nats of
validation loss; a margin of ``m`` nats is a perplexity ratio of ``exp(m)`` (0.02 nats =
2 %, 0.06 nats = 6 %, e.g. 2 perplexity points at the Equifinality paper's perplexity 34).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from routelab.core.errors import ConfigError, suggest


@dataclass(frozen=True)
class Check:
    """One statistical check of a claim (see the module docstring)."""

    label: str
    statement: str
    metric: str
    kind: str
    arm: str
    baseline: str | None = None
    threshold: float | None = None
    margin: float | None = None
    paper: str = ""
    sweep: bool = False

    @property
    def arms(self) -> tuple[str, ...]:
        return (self.arm,) if self.baseline is None else (self.arm, self.baseline)


@dataclass(frozen=True)
class Claim:
    """A paper's claim: ``id`` (1, 2, ...), ``name`` (a slug for the command line), the paper,
    the statement in one sentence, its checks, and notes on how it is tested here."""

    id: str
    name: str
    paper: str
    statement: str
    checks: tuple[Check, ...]
    note: str = ""
    prediction: bool = False
    arms_extra: tuple[str, ...] = field(default=())

    @property
    def arms(self) -> tuple[str, ...]:
        keys: list[str] = []
        for check in self.checks:
            keys += [a for a in check.arms if a not in keys]
        return tuple(keys + [a for a in self.arms_extra if a not in keys])


NONINFERIOR_MARGIN = 0.02  # nats: "equal or better" allows 2 % perplexity

CLAIMS: tuple[Claim, ...] = (
    Claim(
        "1", "loss-free",
        "Wang et al. 2024, Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts (arXiv 2408.15664)",
        "Loss-free balancing reaches a lower MaxVio than the aux-loss baseline at equal or better loss.",
        (
            Check("1a", "MaxVio (validation set) lower than aux loss", "max_vio_final", "lower", "loss-free", "aux",
                  paper="MaxVio_global 0.04 vs 0.72 (1B model; 3B: 0.04 vs 0.52)", sweep=True),
            Check("1b", "validation loss not worse than aux loss by > 0.02 nats", "val_loss", "noninferior",
                  "loss-free", "aux", margin=NONINFERIOR_MARGIN,
                  paper="perplexity 9.50 vs 9.56 (1B; 3B: 7.92 vs 7.97)", sweep=True),
        ),
    ),
    Claim(
        "2", "expert-choice",
        "Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing (arXiv 2202.09368); "
        "EC-DLM, expert choice for diffusion LMs with timestep-dependent capacity (zhangshuibai/EC-DLM)",
        "Expert choice balances perfectly and matches token choice at equal FLOPs; in a diffusion LM "
        "timestep-dependent capacity helps.",
        (
            Check("2a", "expert choice: MaxVio (validation set) = 0 (below 1e-6)", "max_vio_final", "below",
                  "dlm-ec", threshold=1e-6, paper="perfect load balance by construction"),
            Check("2b", "expert choice: loss not worse than token choice by > 0.02 nats", "val_loss", "noninferior",
                  "dlm-ec", "dlm-aux", margin=NONINFERIOR_MARGIN,
                  paper="> 2x faster training convergence than top-1/top-2 token choice (8B/64E)"),
            Check("2c", "EC-DLM capacity schedule: loss lower than static expert choice", "val_loss", "lower",
                  "dlm-ecdlm", "dlm-ec",
                  paper="linear_reverse capacity is the repository's best run (no number published)"),
        ),
        note="All three arms train the masked-diffusion TinyLM (bidirectional attention), where expert choice "
        "does not see the future it would leak in a causal LM. Loss = the diffusion ELBO (nats per token).",
    ),
    Claim(
        "3", "equifinality",
        "Ternovtsii & Bilak 2026, Equifinality in Mixture of Experts: Routing Topology Does Not Determine "
        "Language Modeling Quality (arXiv 2604.14419)",
        "Hash and random-fixed routing come within 1-2 perplexity points of learned routing, and "
        "low-dimensional cosine routing is equivalent to linear routing.",
        (
            Check("3a", "hash equivalent to learned (aux) within 0.06 nats", "val_loss", "equivalent", "hash", "aux",
                  margin=0.06, paper="1.1-2.2 PPL worse at PPL ~34 (single seed)", sweep=True),
            Check("3b", "random-fixed equivalent to learned within 0.06 nats", "val_loss", "equivalent",
                  "random-fixed", "aux", margin=0.06, paper="1.1-2.2 PPL worse at PPL ~34 (single seed)"),
            Check("3c", "cosine equivalent to linear within 0.03 nats", "val_loss", "equivalent", "cosine", "aux",
                  margin=0.03, paper="cosine variants within 1 PPL of each other (TOST p < 0.05); "
                  "linear 32.76 vs cosine 33.93-34.72"),
        ),
        note="Margins: 2 PPL (3a, 3b) and 1 PPL (3c) at the paper's PPL 34, as log ratios (0.06 and 0.03 nats).",
    ),
    Claim(
        "4", "kmeans",
        "Ahrac, Hochwald & Geva 2026, Routers Learn the Geometry of Their Experts (arXiv 2605.12476)",
        "The online k-means router has the lowest imbalance of the routers compared, at a modest perplexity cost.",
        (
            Check("4a", "MaxVio lower than aux loss", "max_vio_final", "lower", "kmeans", "aux",
                  paper="lowest load imbalance of aux-loss, loss-free and k-means"),
            Check("4b", "MaxVio lower than loss-free", "max_vio_final", "lower", "kmeans", "loss-free",
                  paper="lowest load imbalance of aux-loss, loss-free and k-means"),
            Check("4c", "loss at most 0.06 nats worse than aux loss", "val_loss", "noninferior", "kmeans", "aux",
                  margin=0.06, paper="a modest perplexity increase"),
        ),
    ),
    Claim(
        "5", "ssr",
        "Nguyen et al. 2025, Selective Sinkhorn Routing for Improved Sparse Mixture of Experts (arXiv 2511.08972)",
        "Selective Sinkhorn Routing, without an aux loss, reaches a lower loss than the aux-loss baseline.",
        (
            Check("5a", "validation loss lower than aux loss", "val_loss", "lower", "ssr", "aux",
                  paper="faster training and higher accuracy than SMoE baselines with aux losses", sweep=True),
        ),
    ),
    Claim(
        "6", "top-p",
        "Huang et al. 2024, Harder Tasks Need More Experts: Dynamic Routing in MoE Models (arXiv 2403.07652)",
        "Top-p routing uses fewer than k experts per token on average at equal or better quality.",
        (
            Check("6a", "active experts per token below k = 2", "active_experts_per_token", "below", "top-p",
                  threshold=2.0, paper="< 90 % of top-2's activated parameters"),
            Check("6b", "loss not worse than top-2 aux loss by > 0.02 nats", "val_loss", "noninferior", "top-p",
                  "aux", margin=NONINFERIOR_MARGIN, paper="+0.7 % average downstream accuracy over top-2"),
        ),
    ),
    Claim(
        "7", "bip",
        "Sun 2025, Binary-Integer-Programming Based Algorithm for Expert Load Balancing in MoE Models "
        "(arXiv 2502.15451)",
        "BIP-based balancing keeps every expert within capacity from the first training step.",
        (
            Check("7a", "per-batch MaxVio of the first 10 steps below 0.05", "max_vio_first10", "below", "bip",
                  threshold=0.05, paper="balanced on every expert of every layer from the first step"),
        ),
        note="Our reconstruction of BIP balances each batch with 2 dual iterations; it is not expected to "
        "reach MaxVio 0 from step 1, and this row records what it does.",
    ),
    Claim(
        "8", "shared-experts-lrc",
        "Liang et al. 2025, Not All Models Suit Expert Offloading: On Local Routing Consistency of MoE Models "
        "(arXiv 2505.16056)",
        "Without shared experts, local routing consistency (segment cache hit rate SCH) is higher.",
        (
            Check("8a", "SCH at a 2k cache higher without a shared expert", "sch_2k", "higher", "aux", "aux-shared",
                  paper="models without shared experts show the highest local routing consistency"),
        ),
    ),
    Claim(
        "9", "cache-2k",
        "Liang et al. 2025, Not All Models Suit Expert Offloading (arXiv 2505.16056)",
        "An expert cache of about twice the active experts per layer is where hit-rate gains level off.",
        (
            Check("9a", "SCH gain per cache slot from k to 2k exceeds that from 2k to E", "cache_knee", "above",
                  "aux", threshold=0.0, paper="most models balance effectiveness and efficiency at a cache of ~2x "
                  "the active experts"),
        ),
        note="With 8 experts and k = 2 the curve has only the points k = 2, 2k = 4 and E = 8.",
    ),
    Claim(
        "10", "llep",
        "Nguyen et al. 2026, Least-Loaded Expert Parallelism: Load Balancing an Imbalanced MoE (arXiv 2601.17111)",
        "LLEP speeds up expert parallelism under imbalanced routing.",
        (
            Check("10a", "unbalanced router: modelled EP step time (8 devices), standard / LLEP, above 1 "
                  "(a prediction)", "llep_speedup", "above", "no-aux", threshold=1.0,
                  paper="up to 5-6x MoE-layer speedup under heavy imbalance; 1.9x on gpt-oss-120b"),
            Check("10b", "unbalanced router: measured EP=2 step time (2 processes), standard / LLEP, above 1",
                  "llep_measured_speedup", "above", "no-aux", threshold=1.0,
                  paper="up to 5-6x MoE-layer speedup under heavy imbalance; 1.9x on gpt-oss-120b"),
        ),
        note="10a is a prediction of the cost model in routelab.systems.ep (lambda 1.3, alpha 1, m 1024; 8 devices, "
        "one expert each) on the validation routing of a router trained without any balancing. 10b measures real "
        "expert parallelism on the same routing: every MoE layer replayed on 2 gloo processes of one thread each "
        "(routelab.parallel.replay_timing; LLEP lambda 1.3, alpha 1, m 128), forward + backward, standard and LLEP "
        "timed in turn; it means 'a device per rank' only where each process has a core of its own. With 2 ranks "
        "the imbalance is milder than with 8 and LLEP moves work only in the layers above lambda. On synthetic "
        "Zipf-1.2 routing the EP layer measured 1.50-1.60x at EP=2 (bench/expert_parallel.py).",
    ),
)


def get_claims(selector: str) -> list[Claim]:
    """``all``, a claim id (``3``) or name (``equifinality``)."""
    if selector == "all":
        return list(CLAIMS)
    for claim in CLAIMS:
        if selector in (claim.id, claim.name):
            return [claim]
    names = [c.name for c in CLAIMS]
    raise ConfigError(
        f"unknown claim {selector!r}.{suggest(selector, names)} Use 'all', an id 1-{len(CLAIMS)} or a name: "
        f"{', '.join(names)} (routelab claims list)."
    )
