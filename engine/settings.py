"""The run's config tree: one YAML file (``configs/*.yaml``) with ``key=value`` overrides.

Each component owns its section's dataclass; this module only composes them. Stages added later
(models, training, synthesis, evaluation, sweeps) add their sections here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.anatomy.masks import ScarSamplerConfig
from engine.demo import DemoConfig
from engine.evaluation.gates import EvaluationConfig
from engine.evaluation.loop import LoopConfig
from engine.evaluation.sweep import SweepConfig
from engine.io.cohort import CohortConfig
from engine.io.splits import SplitConfig
from engine.phantom.config import PhantomConfig
from engine.synthesis.config import SynthesisConfig
from engine.training.controlnet_baseline import ControlNetBaselineStageConfig
from engine.training.data import SliceDataConfig
from engine.training.downstream import DownstreamStageConfig
from engine.training.generator import GeneratorStageConfig
from engine.training.reward import RewardStageConfig
from engine.training.spade import SpadeStageConfig
from engine.training.vae import VAEStageConfig


@dataclass
class EngineConfig:
    """A whole run.

    Args:
        cohort: where the cohort lives and how its stacks are oriented (required).
        run_dir: where the run writes its artifacts and reports.
        seed: the run's base seed; every stage derives its own seeds from it.
        split: patient-level train/val/test split.
        phantom: the embedded phantom cohort (used when the run makes its own cohort).
        scar_sampler: distribution of parametric scars drawn on negative slices.
        data: LV-centred crops, intensity normalization, conditions and augmentation.
        reward: the reward model stage (model, training loop, Ray resources).
        vae: the VAE stage (or a pretrained VAE folder).
        generator: the LGESynthNet stage (base inpainting UNet, then ControlNet with reward loss).
        downstream: the downstream segmenter stage (real only, or real + synthetic).
        spade: the paper's SPADE baselines (one config; ``lgesynth train spade-fc`` / ``spade-lc``
            train the full- and limited-context variants).
        controlnet_baseline: the paper's ControlNet baselines (``lgesynth train controlnet``: one model
            for the ``controlnet`` and ``controlnet-template`` synthesis methods; UNet layout, loop,
            Ray resources, ``template_strength``; text encoder and sampler are ``generator.model``'s).
        synthesis: streaming synthesis into the Zarr store (Ray Data actor pools, store URL).
        evaluation: the three gates (methods compared, seeds, synthetic samples per method).
        sweep: the Ray Tune sweep of synthetic sample counts x filter thresholds (``lgesynth sweep``).
        loop: failure-targeted synthesis (``lgesynth loop``): rounds, samples per round, seeds, reweighting.
        demo: what ``lgesynth demo`` adds (phantom size and seed).

    Example:
        >>> from engine.config import load_config
        >>> cfg = load_config(EngineConfig, "configs/demo.yaml", ["split.seed=3"])  # doctest: +SKIP
    """

    cohort: CohortConfig
    run_dir: str = "runs/demo"
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    scar_sampler: ScarSamplerConfig = field(default_factory=ScarSamplerConfig)
    data: SliceDataConfig = field(default_factory=SliceDataConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    generator: GeneratorStageConfig = field(default_factory=GeneratorStageConfig)
    downstream: DownstreamStageConfig = field(default_factory=DownstreamStageConfig)
    spade: SpadeStageConfig = field(default_factory=SpadeStageConfig)
    controlnet_baseline: ControlNetBaselineStageConfig = field(default_factory=ControlNetBaselineStageConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir must be a non-empty path")
        if "://" in str(self.run_dir):
            raise ValueError(f"run_dir {self.run_dir!r}: the run folder must be a local or shared-filesystem path "
                             "(on a cluster, a volume every node mounts); object storage URLs go to "
                             "synthesis.store and <stage>.ray.storage_path")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

