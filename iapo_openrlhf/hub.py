"""What a training run reads from the Hugging Face Hub, and the cache that lets compute nodes run offline.

Every Ray actor, reference and vLLM engine of `iapo-train-ray` calls `from_pretrained` on the
actor's model name, and OpenRLHF calls `datasets.load_dataset` on prompt/eval datasets that are
not local files. Compute nodes of most clusters have no internet: `iapo-slurm prefetch` downloads
all of that into a cache directory on the login node (a filesystem the compute nodes mount), and
`iapo-slurm submit` checks it is there, then runs the job with the hub offline and `HF_HOME` on
that cache (`job_env`).

The cache directory is an `HF_HOME`: models in `<dir>/hub` (huggingface_hub's layout,
`models--ORG--NAME/snapshots/<commit>`), datasets prepared by `datasets` in `<dir>/datasets`.
Downloads and the offline re-load that verifies them run in a subprocess
(`python -m iapo_openrlhf.hub download|verify`) whose environment is the job's, because
huggingface_hub and datasets read their cache and offline settings once, at import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# OpenRLHF's blending_datasets reads these extensions as local files; any other name that is not a
# directory goes to datasets.load_dataset (the hub).
DATA_EXTS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")
# A hub repo id: ORG/NAME, or a legacy NAME (gpt2); the hub allows letters, digits and -_. .
REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# What a model's snapshot needs for from_pretrained (config, weights, tokenizer, generation config,
# chat template, remote code); *.bin only for repos without safetensors (vLLM and transformers
# prefer safetensors, and many repos carry both).
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja", "*.jinja2"]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class NeedError(ValueError):
    """A model or dataset that cannot be found or fetched; the message is one line."""


@dataclass(frozen=True)
class Need:
    kind: str  # "model" | "dataset"
    name: str  # a hub repo id, or a local path
    source: str  # where the run names it: "model.path", "--reward.model_name_or_path", ...
    local: bool  # a local directory/file (nothing to fetch) rather than a hub name
    data_dir: str | None = None  # datasets: OpenRLHF's NAME@DATA_DIR form

    @property
    def label(self) -> str:
        suffix = f"@{self.data_dir}" if self.data_dir else ""
        return f"{self.kind} {self.name}{suffix} ({self.source})"


# -- the cache and the job's environment ------------------------------------------------------------

def default_cache_dir() -> Path:
    """huggingface_hub's own default: $HF_HOME, else ~/.cache/huggingface."""
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser()


def cache_env(cache_dir: Path) -> dict[str, str]:
    cache_dir = Path(cache_dir)
    return {"HF_HOME": str(cache_dir), "HF_HUB_CACHE": str(cache_dir / "hub"),
            "HF_DATASETS_CACHE": str(cache_dir / "datasets")}


def job_env(cache_dir: Path, offline: bool = True) -> dict[str, str]:
    """The environment every process of the job gets for the hub: the cache, and offline mode."""
    env = cache_env(cache_dir)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def snapshot_dir(repo_id: str, hub_cache: Path) -> Path | None:
    """The cached snapshot of repo_id's main revision (huggingface_hub's layout), if any."""
    folder = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (folder / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = folder / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def missing_model_files(directory: Path) -> list[str]:
    """What from_pretrained will miss in a model directory: config, weights (every shard of an
    index), tokenizer. Empty when complete. Dangling cache symlinks count as missing."""
    d = Path(directory)
    missing = [] if (d / "config.json").is_file() else ["config.json"]
    index = next((d / name for name in WEIGHT_INDEXES if (d / name).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return missing + [f"{index.name} (unreadable)"]
        missing += [s for s in shards if not (d / s).is_file()]
    elif not any((d / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (" + ", ".join(TOKENIZER_FILES) + ")")
    return missing


def dataset_cache_dir(name: str, datasets_cache: Path) -> Path:
    """Where datasets keeps a hub dataset it has prepared (CachedDatasetModuleFactory's path)."""
    return Path(datasets_cache) / "___".join(name.split("/"))


def model_dir(need: Need, hub_cache: Path) -> Path | None:
    return Path(need.name) if need.local else snapshot_dir(need.name, hub_cache)


# -- what a run needs ----------------------------------------------------------------------------------

_OPTIONS = {  # OpenRLHF option -> (kind, config key it comes from)
    "--actor.model_name_or_path": ("model", "model.path"),
    "--reward.model_name_or_path": ("model", None),
    "--critic.model_name_or_path": ("model", None),
    "--data.prompt_dataset": ("dataset", "data.train_path"),
    "--eval.dataset": ("dataset", "data.test_path"),
}


def _classify_model(name: str, source: str) -> Need:
    if os.path.isdir(name):
        return Need("model", name, source, local=True)
    if REPO_ID_RE.match(name) and not name.startswith((".", "/", "~")):
        return Need("model", name, source, local=False)
    raise NeedError(f"{source} {name}: no such directory here, and not a hub name like Qwen/Qwen2.5-7B-Instruct "
                    "(expected a saved HF model directory on a filesystem the compute nodes mount, or a hub name)")


def _classify_dataset(spec: str, source: str) -> Need:
    """OpenRLHF's rules (blending_datasets): NAME[@DATA_DIR]; a known file extension or a directory
    is local, anything else is a hub dataset."""
    name, _, data_dir = spec.partition("@")
    name, data_dir = name.strip(), data_dir.strip() or None
    if os.path.splitext(name)[1].lower() in DATA_EXTS or os.path.isdir(name):
        return Need("dataset", name, source, local=True, data_dir=data_dir)
    if REPO_ID_RE.match(name) and not name.startswith((".", "/", "~")):
        return Need("dataset", name, source, local=False, data_dir=data_dir)
    raise NeedError(f"{source} {spec}: no such file or directory here, and not a hub dataset name like "
                    "openai/gsm8k (expected a JSONL/JSON/CSV/Parquet file, a saved dataset directory or a hub name)")


def needs(cfg: Any, train_args: list[str] | None = None) -> list[Need]:
    """Models and datasets the run reads, from the config and the OpenRLHF options passed after it
    (later options win, as in iapo-train-ray). Raises NeedError for a name that is neither."""
    argv: list[str] = []
    if cfg.model.path:
        argv += ["--actor.model_name_or_path", cfg.model.path]
    if cfg.data.task == "jsonl":
        # the evaluations during training read the validation split when there is one (config_args)
        for option, value in (("--data.prompt_dataset", cfg.data.train_path),
                              ("--eval.dataset", cfg.data.val_path or cfg.data.test_path)):
            if value:
                argv += [option, value]
    argv += shlex.split(cfg.cluster.extra_args) + list(train_args or [])
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option in _OPTIONS:
        parser.add_argument(option, dest=option)
    known, _ = parser.parse_known_args(argv)
    explicit = set()
    for arg in shlex.split(cfg.cluster.extra_args) + list(train_args or []):
        explicit.add(arg.split("=", 1)[0])
    result: list[Need] = []
    seen = set()
    for option, (kind, config_key) in _OPTIONS.items():
        value = getattr(known, option)
        if not value:
            continue
        if option == "--eval.dataset" and cfg.data.val_path:
            config_key = "data.val_path"
        source = option if (option in explicit or config_key is None) else config_key
        for spec in value.split(","):
            if not spec.strip():
                continue
            need = _classify_model(spec.strip(), source) if kind == "model" else _classify_dataset(spec, source)
            key = (need.kind, need.name, need.data_dir)
            if key not in seen:
                seen.add(key)
                result.append(need)
    return result


# -- the submit-time check -------------------------------------------------------------------------------

def check_available(items: list[Need], cache_dir: Path, fix: str) -> list[str]:
    """Raise NeedError (one line, ending with `fix`) for the first model or hub dataset the job could
    not load offline; return one line per item found (where)."""
    env = cache_env(cache_dir)
    hub_cache, datasets_cache = Path(env["HF_HUB_CACHE"]), Path(env["HF_DATASETS_CACHE"])
    found = []
    for need in items:
        if need.kind == "model":
            directory = model_dir(need, hub_cache)
            if directory is None:
                raise NeedError(f"{need.source} {need.name}: no such directory here, and not in the cache {cache_dir} "
                                f"as a hub model (compute nodes run with the hub offline): {fix}")
            missing = missing_model_files(directory)
            if missing:
                where = "the directory" if need.local else f"the cache {cache_dir}"
                raise NeedError(f"{need.source} {need.name}: incomplete in {where} (missing {', '.join(missing[:3])}): "
                                + (fix if not need.local else "expected a saved HF model (save_pretrained)"))
            found.append(f"{need.label}: {'local directory' if need.local else directory}")
        elif need.local:
            found.append(f"{need.label}: local, read on the cluster")
        elif not dataset_cache_dir(need.name, datasets_cache).is_dir():
            raise NeedError(f"{need.source} {need.name}: hub dataset not in the cache {cache_dir} (compute nodes run "
                            f"with the hub offline): {fix}")
        else:
            found.append(f"{need.label}: {dataset_cache_dir(need.name, datasets_cache)}")
    return found


# -- prefetch ------------------------------------------------------------------------------------------

def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _run_worker(command: str, items: list[Need], env: dict[str, str], *, progress: bool) -> tuple[int, list[dict], str]:
    """`python -m iapo_openrlhf.hub COMMAND` in the job's environment; (code, results, error line).
    progress: its stderr (download progress bars) goes to ours, else it is kept for the error."""
    proc = subprocess.run(
        [sys.executable, "-m", "iapo_openrlhf.hub", command, json.dumps([asdict(n) for n in items])],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True,
    )
    lines = proc.stdout.splitlines()
    results = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
    errors = [line[len("ERROR "):] for line in lines if line.startswith("ERROR ")]
    if not errors and proc.stderr:
        errors = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    reason = (errors or [f"exit code {proc.returncode}"])[-1]
    return proc.returncode, results, reason


def prefetch(items: list[Need], cache_dir: Path, out=None) -> None:
    """Download every hub item into cache_dir, then load each back with the hub offline (as the
    job will). Prints one line per item; raises NeedError (one line) on the first failure."""
    out = out or sys.stdout
    fetch = [n for n in items if not n.local]
    for need in items:
        if need.local:
            exists = os.path.exists(need.name)
            print(f"  {need.label}: local {'directory' if os.path.isdir(need.name) else 'file'}, nothing to fetch"
                  + ("" if exists else f" (warning: {need.name} does not exist here)"), file=out, flush=True)
    if not fetch:
        return
    env = cache_env(cache_dir)
    for need in fetch:
        print(f"  {need.label}: downloading into {cache_dir} ...", file=out, flush=True)
    code, _, reason = _run_worker("download", fetch, env, progress=True)
    if code != 0:
        raise NeedError(f"download failed: {reason}")
    code, results, reason = _run_worker("verify", fetch, job_env(cache_dir, offline=True), progress=False)
    if code != 0:
        raise NeedError(f"downloaded, but does not load with the hub offline: {reason}")
    for need, result in zip(fetch, results):
        print(f"  {need.label}: ok, loads offline ({result['detail']})", file=out, flush=True)


# -- the worker (a subprocess with the job's environment) ----------------------------------------------

def _model_patterns(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi

    files = [s.rfilename for s in (HfApi().model_info(repo_id).siblings or [])]
    patterns = list(MODEL_PATTERNS)
    if not any(f.endswith(".safetensors") for f in files):
        patterns.append("*.bin")
    return patterns


def _download(need: Need) -> dict:
    if need.kind == "model":
        from huggingface_hub import snapshot_download

        path = snapshot_download(need.name, allow_patterns=_model_patterns(need.name))
        return {"path": path}
    import datasets

    datasets.load_dataset(need.name, data_dir=need.data_dir)
    return {"path": os.environ.get("HF_DATASETS_CACHE", "")}


def _verify(need: Need) -> dict:
    if need.kind == "model":
        from transformers import AutoConfig, AutoTokenizer

        # (not snapshot_download(local_files_only=True): without our allow_patterns it calls the
        # snapshot incomplete, since README and the like were not fetched; from_pretrained and vLLM
        # ask for the files they read.)
        path = snapshot_dir(need.name, Path(os.environ["HF_HUB_CACHE"]))
        if path is None:
            raise NeedError(f"{need.label}: no snapshot in {os.environ['HF_HUB_CACHE']} after the download")
        missing = missing_model_files(path)
        if missing:
            raise NeedError(f"{need.label}: the snapshot {path} lacks {', '.join(missing)}")
        config = AutoConfig.from_pretrained(need.name, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(need.name, trust_remote_code=True)
        return {"path": str(path), "detail": f"{config.model_type}, tokenizer of {len(tokenizer)} tokens, "
                                             f"{_human(_size(path))} in {path}"}
    import datasets

    data = datasets.load_dataset(need.name, data_dir=need.data_dir)
    rows = {split: len(d) for split, d in data.items()} if isinstance(data, dict) else {"": len(data)}
    return {"path": os.environ.get("HF_DATASETS_CACHE", ""),
            "detail": ", ".join(f"{split}: {n} rows" for split, n in rows.items())}


def _worker(command: str, payload: str) -> int:
    items = [Need(**raw) for raw in json.loads(payload)]
    action = {"download": _download, "verify": _verify}[command]
    for need in items:
        try:
            result = action(need)
        except Exception as e:  # noqa: BLE001 - one line for the user, whatever the library raised
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"ERROR {need.label}: {type(e).__name__}: {first}", flush=True)
            return 1
        print("RESULT " + json.dumps({"label": need.label, "detail": "", **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
