"""OpenRLHF's PPOTrainer with the IAPO experience maker, a stop request (preemption) and a vLLM reset.

BasePPOTrainer builds its `RemoteExperienceMaker` in `__init__` and the trainer is a Ray actor
in its own process, so the maker is swapped on the instance right after OpenRLHF built it
(same arguments), not by patching a module global that the worker would never see.

Two thin overrides serve the methods: `train_step` tells the maker which rollout step it is on
(the significance reward's schedule), and `get_max_steps` counts GFPO's optimizer steps over the
k kept samples per prompt, not the G sampled (the learning-rate schedule's length).

Preemption (preemption.py): the driver (`iapo-train-ray`) receives SIGTERM / SIGUSR1 and calls
`request_stop`, which runs in its own concurrency group while `fit` runs. OpenRLHF's own `fit`
loop then goes on; two small overrides act at its step boundaries:
- `save_logs_and_checkpoints` (called once per step, after the PPO update and the weight sync):
  when a stop was requested, OpenRLHF's own save runs for this step whatever `--ckpt.save_steps`
  says (its actor `save_checkpoint`: DeepSpeed states, data-loader position, `--ckpt.save_hf`);
- the samples generator's `generate_samples` (called at the start of each step): once the last
  finished step is saved, `Preempted` is raised instead of starting another step. `fit` closes the
  trackers and re-raises; the driver gets it from `ray.get` and exits with 128 + the signal.
  OpenRLHF's `train()` then skips its final HF export: the run is not finished.
A stop requested while a step's evaluation or save was running lets one more step run (that
step's save is then forced). A resumed run (`--ckpt.load_enable`) starts at the next step.

`sync_vllm_before_first_step` (iapo-train-ray --cpu --methods): the run's vLLM engines were
started for an earlier run in the same driver and hold its weights; a fresh run (not a resume)
first syncs its actor's initial weights to them, as a resume does with the checkpoint's.
"""

from __future__ import annotations

import os

import ray
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.utils.logging_utils import init_logger

from ..config import resolved_section
from ..preemption import Preempted, signal_name
from .actor import unwrap_ray_class
from .experience_maker import IAPOExperienceMaker

logger = init_logger(__name__)

CONTROL_GROUP = "iapo_control"  # a concurrency group of its own: callable while fit() runs


def _record_event(name: str, **fields) -> None:
    """An event in the --cpu run's log (a no-op outside --cpu; cpu_mode is not imported then)."""
    if os.environ.get("IAPO_CPU_EVENTS"):
        from .cpu_mode import record_event

        record_event(name, **fields)


class IAPOPPOTrainer(unwrap_ray_class(PPOTrainer)):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        stock = self.experience_maker
        self.experience_maker = IAPOExperienceMaker(
            stock.actor_model_group, stock.critic_model_group, stock.reward_model_group,
            stock.initial_model_group, stock.kl_ctl, stock.strategy, stock.tokenizer,
        )
        self.experience_maker.total_steps = self.rollout_steps()
        self._iapo_stop: int | None = None  # the signal the driver received
        self._iapo_start_step = 0  # where fit() started (the resumed checkpoint's step)
        self._iapo_last_step = 0  # the last step that finished (logged)
        self._iapo_saved_step = 0  # the last step whose checkpoint is on disk
        self._iapo_sync_vllm_first = False
        generate = self.samples_generator.generate_samples

        def generate_samples(*args, **kwargs):  # the start of every step of fit()
            self._stop_if_requested()
            # also called once more after the last step, to find the data exhausted
            _record_event("generate_samples", next_step=self._iapo_last_step + 1)
            return generate(*args, **kwargs)

        self.samples_generator.generate_samples = generate_samples

    def rollout_steps(self) -> int:
        """Rollout steps of the whole run: prompts x episodes / prompts per step."""
        args = self.args
        return max(1, len(self.prompts_dataloader) * args.train.num_episodes // args.rollout.batch_size)

    def train_step(self, rollout_samples, global_step: int):
        self.experience_maker.global_step = global_step
        return super().train_step(rollout_samples, global_step)

    def get_max_steps(self):
        steps = super().get_max_steps()
        methods = self.experience_maker.methods
        if methods.method == "gfpo":
            steps = max(1, steps * resolved_section(methods, "gfpo").keep // self.args.rollout.n_samples_per_prompt)
        return steps

    # ── preemption ──

    @ray.method(concurrency_group=CONTROL_GROUP)
    def request_stop(self, signum: int) -> int:
        """Finish the step in progress, save it, stop (see the module docstring). Returns the last
        finished step."""
        if self._iapo_stop is None:
            self._iapo_stop = int(signum)
            logger.info(f"IAPO: {signal_name(signum)} at the driver after step {self._iapo_last_step}: finishing "
                        "the step in progress, then saving a checkpoint and stopping")
            _record_event("stop_requested", signal=int(signum), last_step=self._iapo_last_step)
        return self._iapo_last_step

    def init_checkpoint_states(self):
        states = super().init_checkpoint_states()
        self._iapo_start_step = self._iapo_last_step = self._iapo_saved_step = int(states["global_step"])
        if self._iapo_sync_vllm_first and not states["global_step"] and self.vllm_engines is not None:
            _record_event("vllm_reset")
            self.broadcast_to_vllm()  # the initial weights; fit() syncs a resumed checkpoint itself
        return states

    def save_logs_and_checkpoints(self, global_step: int, logs_dict=None, client_states=None) -> None:
        save_steps = self.args.ckpt.save_steps
        forced = self._iapo_stop is not None
        if forced:
            self.args.ckpt.save_steps = 1  # OpenRLHF's own save, for this step
        try:
            super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
        finally:
            self.args.ckpt.save_steps = save_steps
        self._iapo_last_step = global_step
        if forced or global_step % save_steps == 0:
            self._iapo_saved_step = global_step
        if forced:
            _record_event("preemption_checkpoint", global_step=global_step, signal=self._iapo_stop)

    def _stop_if_requested(self) -> None:
        if self._iapo_stop is not None and self._iapo_saved_step == self._iapo_last_step:
            saved = self._iapo_last_step > self._iapo_start_step
            raise Preempted(self._iapo_stop, self._iapo_last_step, saved=saved)

    def fit(self, global_step: int = 0) -> None:
        try:
            return super().fit(global_step)
        except Preempted as e:
            logger.info(f"IAPO: stopped: {e}")
            for tracker in (self.wandb_logger, self.tensorboard_logger):
                if tracker is not None:
                    tracker.close()  # what fit() does at its end
            raise

    def sync_vllm_before_first_step(self) -> None:
        self._iapo_sync_vllm_first = True


IAPOPPOTrainerRemote = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(IAPOPPOTrainer)
