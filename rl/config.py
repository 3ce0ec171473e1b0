"""GRPO configuration: the Hydra group `rl` (recipes/rl/*.yaml), validated on construction.

The model comes from the `model` group, the optimizer from `optim`, the tokenizer and the chat switch from `data`,
the trainer's parallel layout from `parallel`; everything about the RL loop lives here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, List, Optional

from latentforge.model.engine.config import EngineConfig, SamplingParams
from latentforge.model.schema import from_dict
from latentforge.rl.rewards.judge import JudgeConfig
from latentforge.rl.rewards.scorer import RewardFunctionConfig
from latentforge.train.config import WandbConfig
from latentforge.model.errors import UserError

WEIGHT_SYNC = ("broadcast", "object_store")
AGGREGATIONS = ("token", "sequence", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3")


class GRPOConfigError(UserError, ValueError):
    """A GRPO setting that cannot work; the message names the field and the fix."""


def _need(ok: bool, message: str):
    if not ok:
        raise GRPOConfigError(message)


def _build(cls, values, where: str):
    return from_dict(cls, values, where, GRPOConfigError)


@dataclass
class PolicyLossConfig:
    clip_low: float = 0.2  # ratio floor 1 - clip_low
    clip_high: float = 0.28  # ratio ceiling 1 + clip_high (clip-higher, DAPO)
    tis_cap: float = 2.0  # truncation of the behaviour importance weight
    kl_coef: float = 0.0  # 0: no reference model
    kl_estimator: str = "k3"
    aggregation: str = "token"  # token: mean over all tokens; sequence: mean of per-sequence means;
    #                             constant: sum / (sequences x max_new_tokens)  (Dr.GRPO)
    normalize_std: bool = True  # advantages divided by the group std (False: Dr.GRPO)

    def __post_init__(self):
        _need(0 <= self.clip_low < 1, f"rl.loss.clip_low must be in [0, 1), got {self.clip_low}")
        _need(self.clip_high >= 0, f"rl.loss.clip_high must be >= 0, got {self.clip_high}")
        _need(self.tis_cap > 0, f"rl.loss.tis_cap must be positive, got {self.tis_cap}")
        _need(self.kl_coef >= 0, f"rl.loss.kl_coef must be >= 0 (0 disables the KL term), got {self.kl_coef}")
        _need(
            self.kl_estimator in KL_ESTIMATORS,
            f"rl.loss.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}",
        )
        _need(
            self.aggregation in AGGREGATIONS,
            f"rl.loss.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}",
        )


@dataclass
class RolloutConfig:
    # keys of the flat layout before the nested engine / sampling configs, named in the unknown-key error
    MOVED_KEYS: ClassVar[dict] = {
        **{k: f"sampling.{k}" for k in ("temperature", "top_p", "top_k", "max_new_tokens")},
        **{k: f"engine.{k}" for k in ("draft_tokens", "draft_gate", "max_batch", "weight_update_policy")},
    }

    num_workers: int = 1
    group_size: int = 4  # G samples per prompt
    # how training samples are drawn (temperature, top_p, top_k, max_new_tokens, extra stop_token_ids). top_p < 1
    # truncates the behaviour distribution: the trainer does not, the importance weight corrects. The request's
    # seed comes from the run; the chat end token is always a stop
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # each worker's generation engine (max_batch slots, draft_tokens, draft_gate, weight_update_policy,
    # prefix_cache_size). Set by the run, whatever this says: max_seq_len (prompt + completion budget), seed (per
    # worker) and record_routes (rl.router_replay)
    engine: EngineConfig = field(default_factory=EngineConfig)
    weight_sync: str = "broadcast"  # torch.distributed broadcast (gloo on CPU, NCCL on GPU), or "object_store"
    sync_bucket_mb: int = 256  # flat buffers of at most this size per broadcast
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1  # torch intra-op threads in the worker process
    # multi-turn environment episodes (tasks with an `env`): assistant turns per episode, and the tokens after
    # the prompt (generated + observations; null: max_turns x max_new_tokens)
    max_turns: int = 4
    max_episode_tokens: Optional[int] = None
    env_step_timeout_s: float = 60.0  # one reset / step of an environment; longer ends the episode (reward 0)

    def __post_init__(self):
        self.sampling = _build(SamplingParams, self.sampling, "rl.rollout.sampling")
        self.engine = _build(EngineConfig, self.engine, "rl.rollout.engine")
        _need(self.num_workers >= 1, f"rl.rollout.num_workers must be >= 1, got {self.num_workers}")
        _need(
            self.group_size >= 2,
            f"rl.rollout.group_size must be >= 2 (advantages compare samples), got {self.group_size}",
        )
        _need(
            self.sampling.temperature > 0,
            f"rl.rollout.sampling.temperature must be > 0 for RL sampling, got {self.sampling.temperature}",
        )
        _need(
            not self.sampling.return_logits,
            "rl.rollout.sampling.return_logits must be false (rollouts keep log-probs, not logits)",
        )
        _need(
            self.weight_sync in WEIGHT_SYNC,
            f"rl.rollout.weight_sync must be one of {WEIGHT_SYNC}, got {self.weight_sync!r}",
        )
        _need(self.max_turns >= 1, f"rl.rollout.max_turns must be >= 1, got {self.max_turns}")
        _need(
            self.max_episode_tokens is None or self.max_episode_tokens >= 1,
            f"rl.rollout.max_episode_tokens must be >= 1 or null, got {self.max_episode_tokens}",
        )
        _need(self.env_step_timeout_s > 0, f"rl.rollout.env_step_timeout_s must be > 0, got {self.env_step_timeout_s}")

    def episode_tokens(self) -> int:
        """The token budget of one environment episode after its prompt."""
        return self.max_episode_tokens or self.max_turns * self.sampling.max_new_tokens


@dataclass
class TrainerGroupConfig:
    num_ranks: int = 1  # trainer processes (their own torch.distributed world; layout from the `parallel` group)
    micro_batch_size: int = 8  # sequences per forward/backward on one data-parallel rank
    cpus_per_rank: float = 0.5
    gpus_per_rank: float = 0.0
    threads_per_rank: int = 1

    def __post_init__(self):
        _need(self.num_ranks >= 1, f"rl.trainer.num_ranks must be >= 1, got {self.num_ranks}")
        _need(self.micro_batch_size >= 1, f"rl.trainer.micro_batch_size must be >= 1, got {self.micro_batch_size}")


@dataclass
class RewardConfig:
    num_workers: int = 1
    cpus_per_worker: float = 0.25
    task_weight: float = 1.0  # weight of the task's own verifier
    functions: List[RewardFunctionConfig] = field(default_factory=list)  # user reward functions, added
    judge: Optional[JudgeConfig] = None  # a model judge (checkpoint, rubric, weight...)

    def __post_init__(self):
        _need(self.num_workers >= 1, f"rl.reward.num_workers must be >= 1, got {self.num_workers}")
        if self.judge is not None:  # from_dict's errors already name rl.reward.judge.<key>
            self.judge = _build(JudgeConfig, self.judge, "rl.reward.judge")
        self.functions = [
            f if isinstance(f, RewardFunctionConfig) else RewardFunctionConfig(**dict(f))
            for f in (self.functions or [])
        ]


@dataclass
class PromptConfig:
    tasks: List[dict] = field(default_factory=lambda: [{"name": "arithmetic", "num": 20000}])
    eval_tasks: List[dict] = field(default_factory=lambda: [{"name": "arithmetic", "num": 64}])  # held-out
    seed: Optional[int] = None  # task seed; None: data.seed (the SFT data's, so held-out stays held out)
    shuffle: bool = True
    order_seed: int = 0  # the prompt order's shuffle

    def __post_init__(self):
        _need(
            bool(self.tasks), "rl.prompts.tasks is empty: list at least one task, e.g. [{name: arithmetic, num: 1000}]"
        )
        for spec in list(self.tasks) + list(self.eval_tasks):
            _need(
                isinstance(spec, dict) or hasattr(spec, "keys"),
                f"rl.prompts tasks must be mappings like {{name: arithmetic, num: 1000}}, got {spec!r}",
            )
        self.tasks = [dict(t) for t in self.tasks]
        self.eval_tasks = [dict(t) for t in (self.eval_tasks or [])]


@dataclass
class GRPOConfig:
    init_from: Optional[str] = None  # the policy's start: a Hugging Face directory or a DCP checkpoint (step_*)
    run_name: str = "grpo"
    run_dir: Optional[str] = None  # null: runs/<run_name>; holding checkpoints: resumes from the newest
    steps: int = 20  # optimizer steps (= policy versions) of the run
    stop_at_step: Optional[int] = None  # end this launch earlier (checkpoint saved)
    groups_per_step: int = 8  # prompts per optimizer step (x group_size sequences)
    max_staleness: int = 1  # K: no trained token older than K versions; 0 = synchronous GRPO
    filter_zero_advantage: bool = True  # dynamic sampling: groups whose rewards are all equal are not trained
    filter_overlong: bool = True  # samples cut by max_new_tokens get no loss (still counted in their group)
    mtp_loss_weight: float = 0.3  # MTP heads keep training on detached trunk features (0: frozen)
    update_expert_bias: bool = False  # aux-loss-free MoE balancing during RL
    # PPO mini-batches: each rollout batch is split into this many optimizer steps (versions), clipped against
    # the proximal policy pi_prox (the weights at the start of the batch; AReaL's decoupled objective). 1: one
    # step per batch, pi_prox = pi_theta, no extra forward
    updates_per_batch: int = 1
    max_consecutive_nonfinite: int = 3  # non-finite GRPO steps in a row (each one skipped) that stop the run
    # fault tolerance, per launch: a dead rollout or reward worker is replaced (its prompts generated again, its
    # samples scored again) this many times in all; a dead trainer rank rebuilds the whole trainer group from the
    # newest checkpoint this many times (the steps after that checkpoint are trained again)
    max_worker_restarts: int = 3
    max_trainer_restarts: int = 1
    # rollout routing replay (R3): the trainer's MoE layers use the experts the rollout engine chose per token
    # (samples must carry `routes`); gate weights still come from the trainer's own router scores
    router_replay: bool = False
    seed: int = 0
    ray_address: Optional[str] = None  # null: a local Ray; "auto": the running cluster (launch/grpo.sbatch)
    log_interval: int = 1
    checkpoint_interval: int = 10
    keep_last: int = 2
    resume: bool = True
    eval_interval: int = 0  # held-out evaluation every N steps (0: only before the first and after the last)
    eval_temperature: float = 0.0  # the one-answer-per-prompt evaluation; 0 = greedy
    eval_samples: int = 4  # plus this many answers per prompt at the rollout temperature (0: none)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerGroupConfig = field(default_factory=TrainerGroupConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # pretraining's W&B settings (train/config.py)

    def __post_init__(self):
        self.loss = _build(PolicyLossConfig, self.loss, "rl.loss")
        self.rollout = _build(RolloutConfig, self.rollout, "rl.rollout")
        self.trainer = _build(TrainerGroupConfig, self.trainer, "rl.trainer")
        self.reward = _build(RewardConfig, self.reward, "rl.reward")
        self.prompts = _build(PromptConfig, self.prompts, "rl.prompts")
        self.wandb = _build(WandbConfig, self.wandb, "rl.wandb")
        _need(self.steps >= 1, f"rl.steps must be >= 1, got {self.steps}")
        _need(
            self.stop_at_step is None or 0 < self.stop_at_step <= self.steps,
            f"rl.stop_at_step must be in (0, rl.steps={self.steps}] or null, got {self.stop_at_step}",
        )
        _need(self.groups_per_step >= 1, f"rl.groups_per_step must be >= 1, got {self.groups_per_step}")
        _need(self.max_staleness >= 0, f"rl.max_staleness must be >= 0 (0 = synchronous), got {self.max_staleness}")
        _need(
            self.updates_per_batch >= 1,
            f"rl.updates_per_batch must be >= 1 (optimizer steps per rollout batch), got {self.updates_per_batch}",
        )
        for name in ("steps", "stop_at_step"):
            value = getattr(self, name)
            _need(
                value is None or value % self.updates_per_batch == 0,
                f"rl.{name}={value} counts optimizer steps and must be a multiple of "
                f"rl.updates_per_batch={self.updates_per_batch} (each rollout batch is that many steps)",
            )
        _need(
            self.max_consecutive_nonfinite >= 1,
            f"rl.max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}",
        )
        for name in ("max_worker_restarts", "max_trainer_restarts"):
            _need(
                getattr(self, name) >= 0,
                f"rl.{name} must be >= 0 (0: a death stops the run), got {getattr(self, name)}",
            )
        _need(self.mtp_loss_weight >= 0, f"rl.mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")
        for name in ("log_interval", "checkpoint_interval", "keep_last"):
            _need(getattr(self, name) >= 1, f"rl.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def last_step(self) -> int:
        return self.stop_at_step or self.steps

    @classmethod
    def from_dict(cls, values) -> "GRPOConfig":
        if not isinstance(values, dict):
            from omegaconf import OmegaConf

            values = OmegaConf.to_container(values, resolve=True)
        return _build(cls, values, "rl")

    def to_dict(self) -> dict:
        return asdict(self)
