"""The layouts of a training run as registered parts, and the contract the loop trains them by.

A layout is how the model and its optimizer are spread over the ranks: today "deepspeed" (the
whole RCN in one DeepSpeed engine per rank, rcn_dist/parallel/deepspeed_layout.py) and "pipeline"
(the encoder stack on one rank, the decoder on the next, rcn_dist/parallel/pipeline.py). Each is
one module that registers a `LayoutSpec`:

- `check_config(cfg, launch)`: refuse, before any process group starts, what it cannot run;
- `pipeline_stages`: the ranks that hold one copy of the model (the rest of the world is data
  parallel: `rcn_dist.parallel.env.RankLayout`), and `groups`: whether it needs the pipeline and
  data-parallel process groups built for it;
- `check_resume(ckpt_dir, cfg, launch)`: whether the checkpoint the run resumes from is one it
  loads;
- `build(run) -> Layout`: the model and optimizer of this rank, as the loop drives them.

`rcn_dist.train` asks the registry (`choose(cfg)`) and `rcn_dist.loop` drives the `Layout`;
neither names a layout. parallel.layout picks one by name; "auto" (the default) picks the shipped
one registered for parallel.pipeline_stages. A new layout is one module calling `register` (it
need not live in the package: tests/test_layout_plugin.py registers a plain torch.optim layout
from a test file). docs/parallelism.md, "Layouts", walks through it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rcn_dist.config import Config, ConfigError
from rcn_dist.errors import CheckpointError
from rcn_dist.parallel.checkpoint import saved_layout
from rcn_dist.parallel.env import LaunchEnv, RankGroups

BUILTIN = ("rcn_dist.parallel.deepspeed_layout", "rcn_dist.parallel.pipeline")
"""The modules that register the shipped layouts, imported at the first look-up (they import
torch, the model and the evaluation; this registry is imported by what they import)."""
AUTO = "auto"


class Layout(Protocol):
    """What `rcn_dist.loop.run_loop` needs from a layout on this rank; nothing else is asked."""

    loss_ranks: int
    """How many ranks' loss parts the step's all-reduce adds up (the ranks that hold a loss)."""

    def forward_backward(self, batch: dict[str, torch.Tensor], eps: torch.Tensor, last: bool) -> torch.Tensor | None:
        """Forward and backward of one of a step's train.grad_accum micro-batches (latent noise
        eps (B, T, z_dim)): the batch means of model.losses.TERMS, (5,) float64 on the device,
        None on a rank that holds no loss. After the `last` one the gradients are ready."""

    def update(self) -> None:
        """The optimizer step (and the LR schedule's), after every rank agreed the losses are finite."""

    def lr(self) -> float:
        """The learning rate after the update."""

    def evaluate(self, stream: Any, max_batches: int) -> dict[str, Any]:
        """rcn_dist.evaluation.evaluate's metrics of this layout's model on the stream (collective)."""

    def save(self, step: int, loop_state: dict[str, Any]) -> Path:
        """The checkpoint of this step, through checkpoint.commit (collective); its directory."""

    def load(self, ckpt_dir: Path) -> dict[str, Any]:
        """Restore weights, optimizer, LR schedule and RNG from a checkpoint; the loop state saved
        with it, whose "loader" is None when the saved data positions do not apply here."""


@dataclass
class LayoutParts:
    """A `Layout` made of plain functions, as the shipped layouts build theirs."""

    forward_backward: Callable[[dict[str, torch.Tensor], torch.Tensor, bool], torch.Tensor | None]
    update: Callable[[], Any]
    lr: Callable[[], float]
    evaluate: Callable[[Any, int], dict[str, Any]]
    save: Callable[[int, dict[str, Any]], Path]
    load: Callable[[Path], dict[str, Any]]
    loss_ranks: int


@dataclass
class Run:
    """A started run, what rcn_dist.loop.setup_run gives a layout's build() and run_loop()."""

    cfg: Config
    launch: LaunchEnv
    """This rank's launch environment; launch.ranks its place in the layout's rank grid."""
    run_dir: Path
    out: Any
    """The rank's console (rcn_dist.console.Console: rank 0 prints)."""
    logger: Any
    stop: Any
    """The run's stop flag (rcn_dist.signals.StopFlag)."""
    latest: Path | None
    """The checkpoint to resume from (rank 0 picked it, every rank was told), or None."""
    speed: Any
    """The step's speed settings (rcn_dist.speed), applied to torch already; a layout lays its
    model out with speed.prepare."""
    engine_json: dict[str, Any] = field(default_factory=dict)
    """The --deepspeed JSON; engine.resolve_engine_settings already folded its ZeRO stage and
    precision into cfg (a layout without a DeepSpeed engine needs nothing else of it)."""
    groups: RankGroups = field(default_factory=RankGroups)
    """The pipeline and data-parallel groups, where the layout's spec asked for them."""


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class LayoutSpec:
    """One registered layout."""

    name: str
    """What parallel.layout names it by; also recorded in its checkpoints' COMPLETE."""
    build: Callable[[Run], Layout]
    """The layout of this rank, once the process group is up and the checkpoint to resume known."""
    check_config: Callable[[Config, LaunchEnv], None] = _nothing
    """Raises ConfigError for a config (after engine.resolve_engine_settings) or a world it cannot run."""
    check_resume: Callable[[Path, Config, LaunchEnv], None] = _nothing
    """Raises ConfigError or CheckpointError for a checkpoint it does not resume (every rank, the same one)."""
    pipeline_stages: int = 1
    """Consecutive ranks that hold one copy of the model (parallel.pipeline_stages must equal it)."""
    groups: bool = False
    """Whether build() needs run.groups: the pipeline and data-parallel process groups."""
    init_comm: Callable[[LaunchEnv], None] = _nothing
    """Called on every rank after the process group started (e.g. DeepSpeed's comm wrapper)."""
    auto: bool = False
    """Whether parallel.layout=auto picks it for its pipeline_stages (at most one per count)."""
    describe: str = ""
    """One line for the error that lists the layouts."""


_REGISTRY: dict[str, LayoutSpec] = {}
_loaded = False


def register(spec: LayoutSpec) -> LayoutSpec:
    """Add a layout (again under the same name: replaced, as a re-imported module does)."""
    if spec.name == AUTO or not spec.name:
        raise ValueError(f"a layout cannot be named {spec.name!r}")
    if spec.auto and any(s.auto and s.pipeline_stages == spec.pipeline_stages and s.name != spec.name
                         for s in _REGISTRY.values()):
        raise ValueError(f"layout {spec.name}: another layout is already parallel.layout=auto's choice "
                         f"for {spec.pipeline_stages} pipeline stage(s)")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, LayoutSpec]:
    """Every layout by name, the shipped ones included."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(module)
    return dict(_REGISTRY)


def _listing(specs: dict[str, LayoutSpec]) -> str:
    return ", ".join(f"{s.name} ({s.describe or f'{s.pipeline_stages} stage(s)'})" for s in specs.values())


def choose(cfg: Config) -> LayoutSpec:
    """The layout cfg asks for (parallel.layout, or for "auto" the one registered for
    parallel.pipeline_stages), its own config checks not yet run (they need the launch)."""
    specs = registered()
    name, stages = cfg.parallel.layout, cfg.parallel.pipeline_stages
    if name == AUTO:
        spec = next((s for s in specs.values() if s.auto and s.pipeline_stages == stages), None)
        if spec is None:
            counts = sorted({s.pipeline_stages for s in specs.values() if s.auto})
            raise ConfigError(f"config field parallel.pipeline_stages: must be {' or '.join(map(str, counts))}, "
                              f"got {stages!r}")
        return spec
    spec = specs.get(name)
    if spec is None:
        raise ConfigError(f"config field parallel.layout: no layout {name!r}; registered: {_listing(specs)}")
    if stages != spec.pipeline_stages:
        raise ConfigError(f"config field parallel.pipeline_stages: the {name} layout runs "
                          f"{spec.pipeline_stages} stage(s), got {stages!r}")
    return spec


def check_resume(spec: LayoutSpec, ckpt_dir: Path, cfg: Config, launch: LaunchEnv) -> None:
    """The layout check of the checkpoint a run resumes from (every rank, the one rank 0 picked):
    the layout's own, then the registry's: a checkpoint that records another layout's name
    (checkpoint.commit's `layout`) is refused."""
    spec.check_resume(ckpt_dir, cfg, launch)
    saved = saved_layout(ckpt_dir).get("layout")
    if saved is not None and saved != spec.name:
        raise CheckpointError(f"{ckpt_dir} was written by the {saved} layout, this run is {spec.name}: resume it "
                              f"with parallel.layout={saved} (rcn eval / rcn sample read it as is)")
