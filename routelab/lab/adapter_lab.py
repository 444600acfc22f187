"""The adapter lab (routing level 2): a frozen TinyLM, per-task LoRA experts, routing methods
compared on held-in and held-out (composed) tasks.

Stages, each stored in the output folder so that a rerun continues where it stopped:

1. ``base/``: a dense TinyLM trained on the corpus by ``routelab.lab.train`` (then frozen);
2. ``experts.pt``: one LoRA expert per held-in task (trained together, each sequence routed
   to its own task's expert), also written as peft folders under ``experts_peft/`` when peft
   is installed;
3. ``results/<method>.json``: each method trained (when it trains anything) and evaluated:
   per-task target loss and next-token accuracy, the task x skill routing matrix and the
   effective support size;
4. ``report.md``, ``results.csv``, plots (``routelab.lab.adapter_report``).

Methods: ``base`` (no adapter), ``oracle`` (one LoRA per task; on held-out tasks the best
held-in expert, chosen on the evaluation set), ``multitask`` (one LoRA on all held-in
tasks), ``uniform`` (uniform merge of the experts), ``poly`` and ``mhr`` (skills and task
logits trained on held-in tasks; held-out task logits fitted few-shot with the skills
frozen, MHR-z), ``glider`` (PHATGOOSE gates trained per expert, global similarity of the
task instructions embedded by the frozen base model's token embeddings), ``topk`` (a
``mixtral`` top-2 router trained over the frozen experts) and ``remix`` (ReMix router over
the frozen experts, RLOO with ``remix_samples`` draws).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, create_model
from rich.console import Console

from routelab.adapters import AdapterSet, attach_adapters, prepare_finetune, rloo_surrogate
from routelab.core import ConfigError
from routelab.lab.adapter_tasks import DEFAULT_HELD_OUT, TaskData, make_tasks
from routelab.lab.checkpoint import load_model
from routelab.lab.config import CorpusSettings, Settings, TrainConfig, settings_field
from routelab.lab.corpus import collect_documents, split_documents
from routelab.lab.data import prepare_corpus
from routelab.lab.train import train_run
from routelab.models.tinylm import TinyLM, TinyLMConfig, shape_fields

METHODS = ("base", "oracle", "multitask", "uniform", "poly", "mhr", "glider", "topk", "remix")
EXPERT_METHODS = ("oracle", "uniform", "glider", "topk", "remix")


# The frozen base is a small dense TinyLM: its shape fields come from TinyLMConfig (one source
# of model configuration), with smaller defaults of its own.
BASE_MODEL_DEFAULTS = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256}


def _base_model_field(name: str, default: int) -> tuple[Any, Any]:
    field = next(f for f in shape_fields() if f.name == name)
    annotation, _ = settings_field(field)
    return annotation, Field(default, ge=field.metadata["minimum"], description=field.metadata["help"])


BaseModelSettings = create_model(
    "BaseModelSettings",
    __base__=Settings,
    __module__=__name__,
    **{name: _base_model_field(name, default) for name, default in BASE_MODEL_DEFAULTS.items()},
)
BaseModelSettings.__doc__ = "Shape of the adapter lab's frozen dense base TinyLM (fields of TinyLMConfig)."


class AdapterLabConfig(Settings):
    """Settings of one adapter-lab comparison (defaults: the run of docs/adapters.md)."""

    out: str = "runs/adapters"
    corpus: CorpusSettings = CorpusSettings(max_bytes_per_domain=400_000, vocab_size=512)
    base_model: BaseModelSettings = BaseModelSettings()
    base_train: TrainConfig = TrainConfig(steps=300, batch_size=16, seq_len=96, lr=3e-3, warmup_steps=30,
                                          eval_every=100, eval_tokens=8192, checkpoint_every=100, log_every=10)
    methods: list[str] = list(METHODS)
    held_out: list[str] = list(DEFAULT_HELD_OUT)
    targets: list[str] = ["qkv", "out", "w_in", "w_out"]
    rank: int = Field(8, ge=1)
    num_skills: int = Field(4, ge=1, description="skills of poly/mhr")
    mhr_heads: int = Field(4, ge=1)
    top_k: int = Field(2, ge=1)
    max_len: int = Field(80, ge=8)
    train_examples: int = Field(400, ge=4)
    eval_examples: int = Field(32, ge=2)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    logit_lr: float = Field(0.1, gt=0, description="lr of Polytropon/MHR task logits (0.1 as in mttl)")
    router_lr: float = Field(1e-2, gt=0)
    expert_steps: int = Field(200, ge=1)
    multitask_steps: int = Field(200, ge=1)
    poly_steps: int = Field(200, ge=1)
    router_steps: int = Field(100, ge=1)
    gate_steps: int = Field(20, ge=1)
    fewshot_steps: int = Field(40, ge=1)
    fewshot_examples: int = Field(32, ge=1)
    glider_scale_held_in: float = 100.0
    glider_scale_held_out: float = 3.0
    remix_samples: int = Field(2, ge=2)
    seed: int = 0

    def check(self) -> AdapterLabConfig:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods {unknown} are not adapter-lab methods; choose from {list(METHODS)}.")
        for name, value in (("d_model", self.base_model.d_model), ("d_ff", self.base_model.d_ff)):
            if value % self.mhr_heads:
                raise ConfigError(f"mhr_heads={self.mhr_heads} must divide the base model's {name}={value}.")
        return self


def smoke_config(out: str | Path, corpus_source: str = "default") -> AdapterLabConfig:
    """A tiny budget for tests and a quick look (seconds, not a result)."""
    return AdapterLabConfig(
        out=str(out), corpus=CorpusSettings(source=corpus_source, max_bytes_per_domain=60_000, vocab_size=300),
        base_model=BaseModelSettings(d_model=32, n_layers=1, n_heads=2, d_ff=64),
        base_train=TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=6,
                               eval_tokens=256, probe_sequences=2, checkpoint_every=6),
        targets=["qkv", "w_out"], rank=4, num_skills=2, mhr_heads=2, max_len=48, train_examples=16, eval_examples=4,
        batch_size=4, expert_steps=3, multitask_steps=2, poly_steps=2, router_steps=2, gate_steps=1,
        fewshot_steps=1, fewshot_examples=4,
    )


class Lab:
    """One comparison: the frozen base, the task data and the shared experts."""

    def __init__(self, config: AdapterLabConfig, console: Console | None = None, show_progress: bool = True) -> None:
        self.config = config.check()
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(config.model_dump(), indent=1))
        options = config.corpus.options()
        corpus = prepare_corpus(options)
        cfg = config.base_model
        model_config = TinyLMConfig(vocab_size=corpus.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                                    n_heads=cfg.n_heads, d_ff=cfg.d_ff, ffn="dense",
                                    max_seq_len=max(config.base_train.seq_len, config.max_len))
        self.console.print("[bold]adapter lab[/]: base TinyLM")
        train_run(self.out / "base", corpus, model_config, config.base_train, resume=True, console=self.console,
                  show_progress=show_progress, label="base")
        self.base, self.tokenizer, _ = load_model(self.out / "base")
        for p in self.base.parameters():
            p.requires_grad_(False)
        documents, _ = collect_documents(options.source, max_bytes_per_domain=options.max_bytes_per_domain,
                                         chunk_bytes=options.chunk_bytes)
        splits = split_documents(documents, options.val_fraction)
        self.held_in, self.held_out = make_tasks(corpus.domains, config.held_out)
        self.tasks = self.held_in + self.held_out
        self.train_data = TaskData(splits["train"], self.tokenizer, self.tasks, max_len=config.max_len,
                                   num_examples=config.train_examples, seed=config.seed)
        self.eval_data = TaskData(splits["val"], self.tokenizer, self.tasks, max_len=config.max_len,
                                  num_examples=config.eval_examples, seed=config.seed + 1)
        self.in_ids = list(range(len(self.held_in)))
        self.out_ids = list(range(len(self.held_in), len(self.tasks)))
        self.rng = np.random.default_rng(config.seed)

    # --- building blocks ----------------------------------------------------------------------

    def fresh(self, method: str, num_experts: int, **options: Any) -> tuple[TinyLM, AdapterSet]:
        torch.manual_seed(self.config.seed)
        model = copy.deepcopy(self.base)
        adapters = attach_adapters(model, self.config.targets, num_experts=num_experts, rank=self.config.rank,
                                   method=method, num_tasks=len(self.tasks), **options)
        return model, adapters

    def train(self, model: TinyLM, adapters: AdapterSet, task_pool: Sequence[int], steps: int, label: str, *,
              lr_of: Callable[[str], float] | None = None, remix: bool = False, data: TaskData | None = None) -> None:
        """AdamW on the trainable parameters (``lr_of(name)`` per parameter; default ``lr``)."""
        config = self.config
        data = data or self.train_data
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault(lr_of(name) if lr_of else config.lr, []).append(p)
        if not groups:
            raise ConfigError(f"{label}: nothing to train.")
        optimizer = torch.optim.AdamW([{"params": ps, "lr": lr} for lr, ps in groups.items()], weight_decay=0.0)
        params = [p for ps in groups.values() for p in ps]
        model.train()
        rng = np.random.default_rng([config.seed, len(label), steps])
        from routelab.lab.train import progress_bars

        with progress_bars(self.console, self.show_progress) as progress:
            task = progress.add_task(label, total=steps, loss="-", speed="-")
            for step in range(steps):
                batch = data.sample(task_pool, config.batch_size, rng)
                loss = self.remix_loss(model, adapters, batch) if remix else self.loss(model, adapters, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress.update(task, completed=step + 1, loss=f"{float(loss.detach()):.3f}")
        model.eval()

    @staticmethod
    def loss(model: TinyLM, adapters: AdapterSet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with adapters.context(task_ids=batch["task_ids"], padding_mask=batch["padding_mask"]) as records:
            out = model(batch["inputs"], batch["targets"], padding_mask=batch["padding_mask"])
        return out.lm_loss + adapters.aux_loss(records)

    def remix_loss(self, model: TinyLM, adapters: AdapterSet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of ``remix_samples`` sampled selections plus ReMix's RLOO surrogate."""
        losses, log_probs = [], []
        for _ in range(self.config.remix_samples):
            with adapters.context(task_ids=batch["task_ids"], padding_mask=batch["padding_mask"]) as records:
                out = model(batch["inputs"], padding_mask=batch["padding_mask"])
            losses.append(sequence_losses(out.logits, batch["targets"]))
            log_prob_B = out.logits.new_zeros(batch["inputs"].shape[0], dtype=torch.float32)
            for _, routing, tokens in records:
                log_prob_B = log_prob_B.index_add(0, tokens.seq_id_T, routing.log_prob_T)
            log_probs.append(log_prob_B)
        losses_MB, log_prob_MB = torch.stack(losses), torch.stack(log_probs)
        return losses_MB.mean() + rloo_surrogate(losses_MB, log_prob_MB)

    def evaluate(self, model: TinyLM, adapters: AdapterSet | None, tasks: Sequence[int],
                 skills: int | None = None) -> dict[str, Any]:
        """Per-task target loss and accuracy, routing mass per skill and effective support size."""
        model.eval()
        per_task: dict[str, Any] = {}
        for task in tasks:
            loss_sum = correct = count = 0.0
            mass = None
            ess_sum = ess_count = 0.0
            for batch in self.eval_data.eval_batches(task, self.config.batch_size):
                with torch.no_grad():
                    if adapters is None:
                        out = model(batch["inputs"], padding_mask=batch["padding_mask"])
                        records = []
                    else:
                        with adapters.context(task_ids=batch["task_ids"], padding_mask=batch["padding_mask"]) as records:
                            out = model(batch["inputs"], padding_mask=batch["padding_mask"])
                targets = batch["targets"]
                scored = targets != -100
                ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="none",
                                     ignore_index=-100)
                loss_sum += float(ce.sum())
                correct += float(((out.logits.argmax(-1) == targets) & scored).sum())
                count += float(scored.sum())
                for _, routing, tokens in records:
                    gates_TE = routing.dense_gates().float()
                    if skills is not None and gates_TE.shape[1] != skills:
                        gates_TE = gates_TE.view(gates_TE.shape[0], -1, skills).sum(dim=1)
                    keep_T = scored.reshape(-1)[tokens.flat_index_T]
                    p_TE = gates_TE[keep_T]
                    p_TE = p_TE / p_TE.sum(dim=1, keepdim=True).clamp_min(1e-20)
                    mass = p_TE.sum(0) if mass is None else mass + p_TE.sum(0)
                    ess_sum += float((1.0 / p_TE.square().sum(1).clamp_min(1e-20)).sum())
                    ess_count += p_TE.shape[0]
            per_task[self.tasks[task].name] = {
                "loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1),
                "routing": (mass / mass.sum()).tolist() if mass is not None else None,
                "effective_support": ess_sum / ess_count if ess_count else None,
            }
        return per_task

    # --- experts -----------------------------------------------------------------------------

    def experts(self) -> dict[str, torch.Tensor]:
        """One LoRA per held-in task (``experts.pt``; trained once, then reused)."""
        path = self.out / "experts.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        model, adapters = self.fresh("task", len(self.held_in), expert_of_task=self._own_expert())
        self.train(model, adapters, self.in_ids, self.config.expert_steps, "experts (one LoRA per task)")
        state = {f"{name}.{key}": value.detach().clone() for name, layer in adapters.layers.items()
                 for key, value in layer.bank.state_dict().items()}
        torch.save(state, path)
        self._save_peft(adapters)
        return state

    def _own_expert(self) -> list[int]:
        """Held-in task t -> expert t; held-out tasks -> expert 0 (replaced where they are evaluated)."""
        return [t if t < len(self.held_in) else 0 for t in range(len(self.tasks))]

    def _save_peft(self, adapters: AdapterSet) -> None:
        try:
            from routelab.adapters.peft_io import save_peft_expert

            for expert, task in enumerate(self.held_in):
                save_peft_expert(adapters, expert, self.out / "experts_peft" / task.name)
        except ConfigError:  # peft not installed: the experts stay in experts.pt only
            self.console.print("[yellow]peft is not installed: experts saved in experts.pt only.[/]")

    def with_experts(self, method: str, **options: Any) -> tuple[TinyLM, AdapterSet]:
        state = self.experts()
        model, adapters = self.fresh(method, len(self.held_in), **options)
        for name, layer in adapters.layers.items():
            layer.bank.load_state_dict({k.split(".")[-1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name})
        adapters.freeze_experts()
        return model, adapters

    # --- methods -------------------------------------------------------------------------------

    def run_method(self, method: str) -> dict[str, Any]:
        path = self.out / "results" / f"{method}.json"
        if path.is_file():
            return json.loads(path.read_text())
        self.console.print(f"[bold]adapter lab[/]: {method}")
        result = getattr(self, f"_run_{method}")()
        result["method"] = method
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        return result

    def _result(self, held_in: dict[str, Any], held_out: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"held_in": held_in, "held_out": held_out, **extra}

    def _run_base(self) -> dict[str, Any]:
        model = copy.deepcopy(self.base)
        return self._result(self.evaluate(model, None, self.in_ids), self.evaluate(model, None, self.out_ids))

    def _run_oracle(self) -> dict[str, Any]:
        model, adapters = self.with_experts("task", expert_of_task=self._own_expert())
        held_in = self.evaluate(model, adapters, self.in_ids, len(self.held_in))
        held_out, chosen = {}, {}
        router_of = {name: layer.router for name, layer in adapters.layers.items()}
        for task in self.out_ids:
            best = None
            for expert in range(len(self.held_in)):
                for router in router_of.values():
                    router.expert_of_task[task] = expert
                scores = self.evaluate(model, adapters, [task], len(self.held_in))[self.tasks[task].name]
                if best is None or scores["loss"] < best[1]["loss"]:
                    best = (expert, scores)
            held_out[self.tasks[task].name] = best[1]
            chosen[self.tasks[task].name] = self.held_in[best[0]].name
        return self._result(held_in, held_out, oracle_expert=chosen)

    def _run_multitask(self) -> dict[str, Any]:
        model, adapters = self.fresh("task", 1, expert_of_task=[0] * len(self.tasks))
        self.train(model, adapters, self.in_ids, self.config.multitask_steps, "multitask LoRA")
        return self._result(self.evaluate(model, adapters, self.in_ids), self.evaluate(model, adapters, self.out_ids))

    def _run_uniform(self) -> dict[str, Any]:
        model, adapters = self.with_experts("uniform")
        skills = len(self.held_in)
        return self._result(self.evaluate(model, adapters, self.in_ids, skills),
                            self.evaluate(model, adapters, self.out_ids, skills))

    def _run_poly(self, method: str = "poly", **options: Any) -> dict[str, Any]:
        config = self.config
        model, adapters = self.fresh(method, config.num_skills, **options)
        lr_of = lambda name: config.logit_lr if name.endswith("router.logits") else config.lr  # noqa: E731
        self.train(model, adapters, self.in_ids, config.poly_steps, f"{method} (skills + task logits)", lr_of=lr_of)
        held_in = self.evaluate(model, adapters, self.in_ids, config.num_skills)
        prepare_finetune(adapters, "z")
        fewshot = self._fewshot_data()
        self.train(model, adapters, self.out_ids, config.fewshot_steps, f"{method}-z few-shot (held-out logits)",
                   lr_of=lambda name: config.logit_lr, data=fewshot)
        held_out = self.evaluate(model, adapters, self.out_ids, config.num_skills)
        return self._result(held_in, held_out)

    def _fewshot_data(self) -> TaskData:
        """The training data restricted to the first ``fewshot_examples`` examples of every task."""
        few = copy.copy(self.train_data)
        few.examples = {name: examples[: self.config.fewshot_examples] for name, examples in self.train_data.examples.items()}
        return few

    def _run_mhr(self) -> dict[str, Any]:
        return self._run_poly("mhr", num_heads=self.config.mhr_heads)

    def _run_glider(self) -> dict[str, Any]:
        config = self.config
        model, adapters = self.with_experts("glider", top_k=min(config.top_k, len(self.held_in)),
                                            global_scale=config.glider_scale_held_in)
        adapters.freeze_routers(True)
        for layer in adapters.layers.values():
            layer.router.gate.requires_grad_(True)
        for expert in range(len(self.held_in)):  # PHATGOOSE: each gate trained after its (frozen) expert
            for router in adapters.routers():
                router.gate_training(expert)
            self.train(model, adapters, [expert], config.gate_steps, f"PHATGOOSE gate {self.held_in[expert].name}",
                       lr_of=lambda name: config.router_lr)
        for router in adapters.routers():
            router.gate_training(None)
        similarity = self.instruction_similarity()
        for router in adapters.routers():
            router.set_task_similarity(similarity)
        held_in = self.evaluate(model, adapters, self.in_ids, len(self.held_in))
        for router in adapters.routers():
            router.global_scale = config.glider_scale_held_out
        held_out = self.evaluate(model, adapters, self.out_ids, len(self.held_in))
        return self._result(held_in, held_out, task_similarity=similarity.tolist())

    def instruction_similarity(self) -> torch.Tensor:
        """``[tasks, experts]`` cosine of the instructions' mean token embedding (frozen base model)."""
        def embed(text: str) -> torch.Tensor:
            ids = torch.tensor(self.tokenizer.encode(text))
            return self.base.embed.weight[ids].mean(0)

        tasks = torch.stack([embed(t.instruction) for t in self.tasks])
        experts = tasks[: len(self.held_in)]
        return F.cosine_similarity(tasks.unsqueeze(1), experts.unsqueeze(0), dim=-1).detach()

    def _run_topk(self) -> dict[str, Any]:
        model, adapters = self.with_experts("topk", router="mixtral", top_k=min(self.config.top_k, len(self.held_in)))
        self.train(model, adapters, self.in_ids, self.config.router_steps, "top-k router over the experts",
                   lr_of=lambda name: self.config.router_lr)
        trace = self.out / "traces" / "topk.trace"
        if not trace.exists():
            self._trace(adapters, trace)
        skills = len(self.held_in)
        return self._result(self.evaluate(model, adapters, self.in_ids, skills),
                            self.evaluate(model, adapters, self.out_ids, skills))

    def _trace(self, adapters: AdapterSet, path: Path) -> None:
        from routelab.adapters.traces import record_adapter_trace

        batches = [(b["inputs"], b["task_ids"]) for task in range(len(self.tasks))
                   for b in self.eval_data.eval_batches(task, self.config.batch_size)[:1]]
        record_adapter_trace(adapters, path, batches, task_names=[t.name for t in self.tasks], overwrite=True)

    def _run_remix(self) -> dict[str, Any]:
        model, adapters = self.with_experts("remix", top_k=min(self.config.top_k, len(self.held_in)))
        self.train(model, adapters, self.in_ids, self.config.router_steps, "ReMix router (RLOO)",
                   lr_of=lambda name: self.config.router_lr, remix=True)
        skills = len(self.held_in)
        return self._result(self.evaluate(model, adapters, self.in_ids, skills),
                            self.evaluate(model, adapters, self.out_ids, skills))


def sequence_losses(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean cross-entropy over each sequence's scored targets."""
    ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), reduction="none", ignore_index=-100)
    ce_BS = ce.view(targets_BS.shape)
    count_B = (targets_BS != -100).sum(dim=1).clamp_min(1)
    return ce_BS.sum(dim=1) / count_B


def run_adapter_lab(config: AdapterLabConfig, *, console: Console | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run (or continue) every stage; return ``{"results": {method: result}, "lab": Lab, "report": path}``."""
    from routelab.lab.adapter_report import write_adapter_report

    lab = Lab(config, console, show_progress)
    results = {method: lab.run_method(method) for method in config.methods}
    report = write_adapter_report(lab, results)
    return {"results": results, "lab": lab, "report": report}
