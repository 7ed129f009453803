"""Config of the synthesis stage: what to synthesize, where to store it, and the Ray Data resources.

The scar distribution is the run's ``scar_sampler`` section and the slices come from the run's
patient split (``<run_dir>/splits.json``); this section only adds what is particular to synthesis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.synthesis.methods import METHODS, PasteConfig

STORE_NAME = "synthetic.zarr"
# Keys that would put a secret into a config file (and from there into logs and store attributes).
CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "session_token", "access_key", "secret_key",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key", "sas_token",
    "client_secret", "credentials", "token_file",
})


def credential_keys(options: Any, prefix: str = "") -> list[str]:
    """Dotted names of credential-like keys anywhere in ``options`` (a nested mapping)."""
    found: list[str] = []
    if isinstance(options, dict):
        for key, value in options.items():
            name = f"{prefix}{key}"
            if str(key).lower() in CREDENTIAL_KEYS:
                found.append(name)
            found += credential_keys(value, name + ".")
    return found


@dataclass
class ActorPoolConfig:
    """One Ray Data actor pool (the diffusion actors or the filter actors).

    Args:
        actors: actors in the pool (each loads its model once).
        num_cpus: CPUs reserved per actor (fractions allowed, e.g. 0.5 to fit two on one core).
        num_gpus: GPUs per actor; fractions share a GPU between actors (e.g. 0.5).
        dtype: "auto" (bfloat16 autocast on GPU, float32 on CPU), "float32" or "bfloat16".
        torch_threads: intra-op threads of torch in each actor (0: leave torch's default); on a
            small CPU machine one thread per actor avoids oversubscription.
        channels_last: the model's convolutions in channels-last memory layout (same results up to
            float rounding; on 2 CPU cores 1.14x the diffusion actor's images/s and 1.29x the
            reward model's, benchmarks/RESULTS.md; the layout GPU tensor cores prefer).
        resources: Ray custom resources each actor needs, to place the pool on some nodes of a
            mixed cluster: a GPU type (``{"accelerator_type:H100": 0.001}``, the resource Ray gives
            nodes of that GPU), a node group's own resource (``ray start --resources``, a KubeRay
            worker group's ``rayStartParams``) or one node (``{"node:<its IP>": 0.01}``).
    """

    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    torch_threads: int = 1
    channels_last: bool = True
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"resources: {name!r} is set by num_cpus / num_gpus, not as a custom resource")
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
                raise ValueError(f"resources: {name!r} needs an amount > 0, got {amount!r}")
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_cpus + self.num_gpus <= 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0 and not both 0, got {self.num_cpus}, {self.num_gpus}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")


@dataclass
class SynthesisConfig:
    """The synthesis stage (DOMAIN.md section 4; DESIGN.md "synthesize").

    Args:
        store: the store's path or fsspec URL (``s3://bucket/prefix/synthetic.zarr``,
            ``memory://...``); empty: ``<run_dir>/synthetic.zarr``.
        storage_options: fsspec options of the store (endpoint, region, ...). Credentials never go
            here: they come from the environment or the provider chain of the workers.
        split: whose negative slices are the sources ("train": synthetic samples must never carry
            validation or test patients' anatomy into downstream training).
        candidates_per_slice: K, candidates drawn on every negative slice.
        seed: the synthesis seed (scar draws and diffusion noise of every candidate derive from it).
        max_candidates: stop the plan after this many candidates (0: all); the first ones in
            sample-id order, so a small run is a prefix of a large one.
        shard_size: candidates per Zarr shard; a shard is the unit of work, written whole by one writer.
        batch_size: candidates per forward pass of a diffusion or filter actor.
        num_inference_steps: sampler steps (0: the generator's own setting).
        threshold: a candidate passes when Dice(predicted scar, conditioning mask) > threshold.
        keep_rejected: keep the images of rejected candidates (else only their metadata: dice,
            caption, source, spec; image, label and condition stay empty).
        compression: how the store's arrays are compressed (:func:`engine.synthesis.store.compressors`):
            "fast" (raw float images, LZ4 masks: writing keeps up with generation), "small" (zarr's
            zstd everywhere: ~15% smaller images for slow or costly object storage) or "none".
            Set when the store is created; an existing store keeps its own.
        method: what fills the scar region (:mod:`engine.synthesis.methods`): "lgesynthnet" (the
            trained generator), "paste" (the model-free control, settings in ``paste``), "spade-fc"
            or "spade-lc" (the paper's SPADE baselines, trained by ``lgesynth train spade-fc|spade-lc``),
            "controlnet" or "controlnet-template" (the paper's ControlNet baselines, one model trained
            by ``lgesynth train controlnet``; the template's strength is ``controlnet_baseline.template_strength``).
        paste: the paste control's settings.
        generator: folder of the exported generator (empty: ``<run_dir>/generator``).
        reward: folder of the exported reward model (empty: ``<run_dir>/reward``).
        spade: folder of the exported SPADE model of a ``spade-*`` method (empty: ``<run_dir>/<method>``,
            where ``lgesynth train <method>`` exports it, so ``spade-fc`` and ``spade-lc`` each find
            their own; a folder set here serves one of them: its variant must match the method).
        controlnet: folder of the exported ControlNet baseline of the ``controlnet`` and
            ``controlnet-template`` methods (empty: ``<run_dir>/controlnet``, where ``lgesynth train
            controlnet`` exports it); it samples on the run's VAE (``vae``), the one it was trained on.
        diffusion: the diffusion actor pool.
        filter: the filter actor pool.
        prepare_cpus: CPUs per candidate-preparation task (scar masks, edge maps, captions).
        address: Ray cluster address (empty: ``RAY_ADDRESS`` or a local instance).
        stall_timeout_s: a Ray pipeline in which no shard completes for this long is stopped and
            started again on the shards still missing (Ray Data can wait forever after a lost node
            or actor); 0 never. Each restart waits twice as long as the one before. Raise it where one
            shard, or a node the autoscaler adds, takes longer.
        stall_restarts: how many such restarts before the run stops with an error (re-run to resume).
        progress_interval_s: every this many seconds a Ray run logs a progress line read from the
            store: shards and candidates complete (earlier runs' included), this run's candidates/s
            and the time left at that rate; 0 never.
    """

    store: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    split: Literal["train", "val", "test"] = "train"
    candidates_per_slice: int = 4
    seed: int = 0
    max_candidates: int = 0
    shard_size: int = 32
    batch_size: int = 8
    num_inference_steps: int = 0
    threshold: float = 0.6
    keep_rejected: bool = False
    compression: Literal["fast", "small", "none"] = "fast"
    method: Literal["lgesynthnet", "paste", "spade-fc", "spade-lc", "controlnet", "controlnet-template"] = "lgesynthnet"
    paste: PasteConfig = field(default_factory=PasteConfig)
    generator: str = ""
    reward: str = ""
    spade: str = ""
    controlnet: str = ""
    diffusion: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    filter: ActorPoolConfig = field(default_factory=lambda: ActorPoolConfig(num_cpus=0.5))
    prepare_cpus: float = 0.25
    address: str = ""
    stall_timeout_s: float = 1800.0
    stall_restarts: int = 2
    progress_interval_s: float = 60.0

    def __post_init__(self) -> None:
        bad = credential_keys(self.storage_options)
        if bad:
            raise ValueError(
                f"storage_options must not hold credentials ({', '.join(bad)}): set them in the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or the cloud's provider chain)")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.compression not in ("fast", "small", "none"):
            raise ValueError(f"compression must be 'fast', 'small' or 'none', got {self.compression!r}")
        if self.split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {self.split!r}")
        for name, lo in (("candidates_per_slice", 1), ("seed", 0), ("max_candidates", 0), ("shard_size", 1),
                         ("batch_size", 1), ("num_inference_steps", 0), ("stall_timeout_s", 0), ("stall_restarts", 0),
                         ("progress_interval_s", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not -1.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [-1, 1) (Dice > threshold passes), got {self.threshold}")
        if self.prepare_cpus <= 0:
            raise ValueError(f"prepare_cpus must be > 0, got {self.prepare_cpus}")

    def store_url(self, run_dir: str) -> str:
        """The store's URL: ``store``, or ``<run_dir>/synthetic.zarr`` (a local run dir made absolute,
        so workers on every node and in any working directory write the same place)."""
        if self.store:
            return self.store if "://" in self.store else str(Path(self.store).absolute())
        return f"{run_dir.rstrip('/')}/{STORE_NAME}" if "://" in str(run_dir) else str(Path(run_dir).absolute() / STORE_NAME)

    def generator_folder(self, run_dir: str) -> Path:
        return Path(self.generator).absolute() if self.generator else Path(run_dir).absolute() / "generator"

    def reward_folder(self, run_dir: str) -> Path:
        return Path(self.reward).absolute() if self.reward else Path(run_dir).absolute() / "reward"

    def spade_folder(self, run_dir: str) -> Path:
        """The exported SPADE model of the method (``spade``, or ``<run_dir>/<method>``)."""
        return Path(self.spade).absolute() if self.spade else Path(run_dir).absolute() / self.method

    def controlnet_folder(self, run_dir: str) -> Path:
        """The exported ControlNet baseline (``controlnet``, or ``<run_dir>/controlnet``)."""
        return Path(self.controlnet).absolute() if self.controlnet else Path(run_dir).absolute() / "controlnet"
