"""Human-readable descriptions of presets (for ``routelab list --markdown`` and the docs)."""

from __future__ import annotations

from torch import nn

from routelab.routers.parts.router import Router
from routelab.routers.references import reference_agreement
from routelab.routers.registry import PRESETS, PresetInfo, create_router


def _part_name(module: nn.Module | None) -> str:
    if module is None:
        return "-"
    extra = module.extra_repr()
    return f"{type(module).__name__}({extra})" if extra else type(module).__name__


def router_parts(router: nn.Module) -> dict[str, str]:
    """The parts of a built router, by role."""
    if not isinstance(router, Router):
        return {"router": type(router).__name__}
    return {
        "scorer": type(router.scorer).__name__,
        "score_fn": type(router.score_fn).__name__,
        "selector": type(router.selector).__name__,
        "gate": _part_name(router.gate_norm),
        "balancer": type(router.balancer).__name__ if router.balancer is not None else "-",
        "losses": ", ".join(f"{loss.name}×{loss.coef:g}" for loss in router.losses) or "-",
        "capacity": _part_name(router.capacity),
    }


def preset_row(info: PresetInfo, d_model: int = 64, num_experts: int = 8) -> dict[str, str]:
    import dataclasses

    from routelab.routers.registry import CommonOptions

    router = create_router(info.name, d_model=d_model, num_experts=num_experts)
    parts = router_parts(router)
    common = dataclasses.asdict(CommonOptions())
    defaults = {k: v for k, v in info.options().items() if k not in common or common[k] != v}
    return {
        "name": info.name,
        "paper": info.paper,
        "parts": "; ".join(f"{k}: {v}" for k, v in parts.items() if v != "-"),
        "defaults": f"top_k={info.default_top_k}; " + ", ".join(f"{k}={v!r}" for k, v in defaults.items()),
        "exemptions": "; ".join(f"{k}: {v}" for k, v in info.exemptions.items()) or "-",
        "reference": reference_agreement(info.name),
    }


def presets_markdown() -> str:
    """A markdown table with one row per registered preset."""
    lines = [
        "| preset | paper | parts (built with E=8) | defaults and own options (besides the common ones) "
        "| property exemptions | agrees with (tolerance, test) |",
        "|---|---|---|---|---|---|",
    ]
    for info in PRESETS:
        row = preset_row(info)
        cells = [f"`{row['name']}`", row["paper"], row["parts"], row["defaults"], row["exemptions"], row["reference"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


BEGIN_MARK = "<!-- BEGIN GENERATED PRESET TABLE (routelab list --markdown) -->"
END_MARK = "<!-- END GENERATED PRESET TABLE -->"


def update_docs(path: str) -> bool:
    """Rewrite the generated table between the markers of ``path``; True if it changed."""
    from pathlib import Path

    text = Path(path).read_text()
    start, end = text.index(BEGIN_MARK) + len(BEGIN_MARK), text.index(END_MARK)
    new = text[:start] + "\n" + presets_markdown() + text[end:]
    if new != text:
        Path(path).write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    update_docs(sys.argv[1] if len(sys.argv) > 1 else "docs/routers.md")
