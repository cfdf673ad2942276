"""What every job script shares: layered frozen config, the run context, and writing the one record.

A job declares its config as a frozen dataclass. :func:`load_config` merges, in order, the dataclass
defaults, an optional JSON experiment file (``--config``), and command-line overrides; unknown keys are
rejected. :class:`Run` opens a run (run id, start time, code state, results folder), collects artefacts,
judges the metrics under the locked entry and writes the record atomically at the end. The record is the
only output a gate decision lives in.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from .lock import DEFAULT_LOCK_PATH, ThresholdLock, gate_template_entry, judge
from .provenance import code_state, package_versions, runtime
from .record import ArtefactWriter, dumps_strict, loads_strict, new_run_id, utc_now, write_json_atomic, write_record

__all__ = ["load_config", "add_config_arguments", "Run", "stage", "default_lock_path", "ConfigError", "JobConfig",
           "job_main", "load_gate_dataset"]

log = logging.getLogger("covtoken.run")
C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """The options every gate job has; a job's config subclasses it and adds its own (all with defaults)."""

    backbone: str = dataclasses.field(default="tiny-vit", metadata={"help": "backbone registry name"})
    weights: str | None = dataclasses.field(default=None, metadata={"help": "local weights replacing the Hub download"})
    revision: str | None = dataclasses.field(default=None, metadata={
        "help": "Hub commit sha of the weights (entries without a pinned one)"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or cuda"})
    results: str = dataclasses.field(default="results/local", metadata={"help": "results folder (record + artefacts)"})
    lock: str | None = dataclasses.field(default=None, metadata={
        "help": "threshold lock (default configs/thresholds.lock.json)"})
    lock_entry: str | None = dataclasses.field(default=None, metadata={
        "help": "lock entry; default <gate>/embedded on the embedded default, <gate>/real otherwise"})
    run_id: str | None = dataclasses.field(default=None, metadata={"help": "fixed run id (resume); new one otherwise"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the data generator, splits and subsamples",
                                                       "min": 0})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "images per forward pass", "min": 1})
    calibration: bool = dataclasses.field(default=False, metadata={
        "help": "calibration run on separate patients; never judged"})
    smoke: bool = dataclasses.field(default=False, metadata={
        "help": "the embedded default: phantoms + tiny ViT on CPU (flags given explicitly take precedence)"})


def job_main(cls: type[C], run: Any, *, script: str, doc: str | None, argv: list[str] | None,
             smoke: Mapping[str, Any]) -> int:
    """The ``main()`` of a job script: parse layered options, set up logging, apply ``--smoke``, run.

    Args:
        cls: the job's config dataclass (a :class:`JobConfig`).
        run: ``run(cfg, command=[...]) -> int``, the job body.
        script: the script path recorded as the command (``jobs/<name>.py``).
        doc: the script's docstring (the ``--help`` text, with its launch commands).
        argv: arguments (default ``sys.argv[1:]``).
        smoke: the config values ``--smoke`` sets (the embedded default).
    """
    from .errors import OneLineParser, report_errors

    parser = OneLineParser(prog=script, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, cls)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    command = [script, *[a for a in argv if a != "--debug"]]

    def body() -> int:
        cfg = apply_smoke(load_config(cls, args), smoke, explicit=explicit_keys(cls, args))
        validate_config(cfg)
        return int(run(cfg, command=command))

    return report_errors(body, debug=args.debug, writing=str(args.results or "the results folder"))


def explicit_keys(cls: type, args: argparse.Namespace) -> set[str]:
    """Config keys the user set: by a flag, or in the ``--config`` file."""
    keys = {f.name for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    if getattr(args, "config", None):
        doc = loads_strict(Path(args.config).read_text(), source=str(args.config))
        keys |= set(doc) if isinstance(doc, dict) else set()
    return keys


def apply_smoke(cfg: C, smoke: Mapping[str, Any], *, explicit: set[str]) -> C:
    """``--smoke`` sets the embedded default for every key the user did not set explicitly (explicit wins, and is
    logged, so ``--smoke --backbone X`` runs X on the phantoms - and fails on an unknown X, never on tiny-vit)."""
    if not getattr(cfg, "smoke", False):
        return cfg
    kept = sorted(k for k in smoke if k in explicit and getattr(cfg, k) != smoke[k])
    if kept:
        log.info("--smoke: keeping the explicit %s", ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in kept))
    return dataclasses.replace(cfg, **{k: v for k, v in smoke.items() if k not in explicit})  # type: ignore[type-var]


def validate_config(cfg: Any) -> None:
    """Bounds from the fields' metadata (``min``) and the backbone name; raises ConfigError naming the flag."""
    for f in dataclasses.fields(cfg):
        v, lo = getattr(cfg, f.name), f.metadata.get("min")
        if lo is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and v < lo:
            raise ConfigError(f"--{f.name.replace('_', '-')}: must be >= {lo}, got {v}")
    if isinstance(getattr(cfg, "backbone", None), str):
        from .backbone.registry import UnknownBackboneError, get_spec

        try:
            get_spec(cfg.backbone)
        except UnknownBackboneError as exc:
            raise ConfigError(f"--backbone: {exc}") from None


def load_gate_dataset(cfg: JobConfig, params: Mapping[str, Any], *, dataset: str, root: str | None = None,
                      options: Mapping[str, Any] | None = None) -> Any:
    """Load a gate's dataset with its locked options (a ``covtoken.data.catalog.LoadedDataset``).

    Embedded (phantom) datasets are generated from the run's seed; a calibration run draws its patients from the
    seed plus the locked ``calibration_seed_offset``, so they are disjoint from every judged run.

    Args:
        cfg: the job config (seed, calibration flag).
        params: the locked protocol parameters (``dataset_options``, ``calibration_seed_offset``).
        dataset: catalog name or source.
        root: folder of a file-based dataset.
        options: loader options replacing ``params["dataset_options"]`` (per-modality options of G2).
    """
    from .data.catalog import is_embedded, load_dataset

    opts = dict(params.get("dataset_options", {}) if options is None else options)
    if is_embedded(dataset):
        opts["seed"] = cfg.seed + (int(params["calibration_seed_offset"]) if cfg.calibration else 0)
    if root:
        opts["root"] = root
    with stage("load_data", dataset=dataset):
        return load_dataset(dataset, **opts)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--<field>`` flag per dataclass field (default ``None`` = not given), plus ``--config FILE``."""
    parser.add_argument("--config", type=Path, help="JSON experiment file layered over the defaults")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=f.metadata.get("help"),
                                metavar=f.name.upper(), type=_flag_type(f.name, f.default))


def _flag_type(name: str, default: Any) -> Callable[[str], Any]:
    """A parse-time check of a flag's value against its field's type (``--seed abc`` fails before any work)."""
    def check(text: str) -> str:
        if text.lower() != "none" or default is not None:
            try:
                if isinstance(default, int) and not isinstance(default, bool):
                    int(text)
                elif isinstance(default, float):
                    float(text)
            except ValueError:
                kind = "an integer" if isinstance(default, int) else "a number"
                raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        return text

    check.__name__ = name
    return check


def _coerce(cls: type, name: str, value: Any, default: Any) -> Any:
    if value is None or default is None and isinstance(value, str) and value.lower() == "none":
        return None
    if isinstance(value, str):
        if isinstance(default, bool):
            raise ConfigError(f"config key {name!r}: expected a boolean")
        try:
            if isinstance(default, int):
                return int(value)
            if isinstance(default, float):
                return float(value)
        except ValueError:
            raise ConfigError(f"config key {name!r}: expected {type(default).__name__}, got {value!r}") from None
        if isinstance(default, (list, tuple)):
            return tuple(v for v in (x.strip() for x in value.split(",")) if v)
        return value
    if isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, bool):
        raise ConfigError(f"config key {name!r}: expected int, got bool")
    if default is not None and not isinstance(value, type(default)) and not (
            isinstance(default, tuple) and isinstance(value, tuple)):
        raise ConfigError(f"config key {name!r}: expected {type(default).__name__}, got {type(value).__name__}")
    return value


def load_config(cls: type[C], args: argparse.Namespace) -> C:
    """Defaults <- ``--config`` JSON file <- explicit command-line flags; returns a frozen instance."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = {n: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for n, f in fields.items()}
    merged = dict(defaults)
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            doc = loads_strict(path.read_text(encoding="utf-8"), source=str(path))
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path}: not UTF-8 JSON text") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: an experiment file must be a JSON object")
        unknown = sorted(set(doc) - set(fields))
        if unknown:
            raise ConfigError(f"{path}: unknown config keys {unknown}; valid keys: {sorted(fields)}")
        for k, v in doc.items():
            try:
                merged[k] = _coerce(cls, k, v, defaults[k])
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    for k in fields:
        v = getattr(args, k, None)
        if v is not None:
            merged[k] = _coerce(cls, k, v, defaults[k])
    return cls(**merged)


def default_lock_path() -> Path:
    """``configs/thresholds.lock.json`` of the working directory, else the copy shipped with the package."""
    if DEFAULT_LOCK_PATH.is_file():
        return DEFAULT_LOCK_PATH
    from importlib import resources

    return Path(str(resources.files("covtoken").joinpath("configs/thresholds.lock.json")))


@contextmanager
def stage(name: str, **fields: Any) -> Iterator[None]:
    """Log structured start/end events (JSON) with the duration; on error log its type, then re-raise."""
    t0 = time.perf_counter()
    log.info(json.dumps({"event": "stage_start", "stage": name, **fields}))
    try:
        yield
    except BaseException as exc:
        log.error(json.dumps({"event": "stage_error", "stage": name, "error": type(exc).__name__,
                              "seconds": round(time.perf_counter() - t0, 3)}))
        raise
    log.info(json.dumps({"event": "stage_end", "stage": name, "seconds": round(time.perf_counter() - t0, 3)}))


class Run:
    """One run of one gate.

    Args:
        gate_id: e.g. ``"G1"``.
        results_dir: where ``<run_id>.json`` and ``artefacts/<run_id>/`` go.
        lock_entry: e.g. ``"G1/embedded"``; the lock is verified now, before any work is done.
        calibration: a calibration run (parameters from ``configs/gates/<gate>.json``, never judged).
        lock_path: the threshold lock file.
        config: the frozen config dataclass (saved in the record).
        seed: the run's seed.
        run_id: fixed id (resuming a job); a new one otherwise.
        backend: ``{"name": "local" | "hf-jobs", "job_id": ...}`` plus free fields.
        command: the job's command line as recorded (default ``sys.argv``).
    """

    def __init__(self, *, gate_id: str, results_dir: str | Path, lock_entry: str, lock_path: str | Path,
                 config: Any, seed: int, run_id: str | None = None, backend: Mapping[str, Any] | None = None,
                 device: str = "cpu", calibration: bool = False, command: list[str] | None = None) -> None:
        self.gate_id = gate_id
        self.results_dir = Path(results_dir)
        self.lock_path = Path(lock_path)
        self.calibration = calibration
        if lock_entry.partition("/")[0] != gate_id:
            raise ValueError(f"lock entry {lock_entry} is not an entry of gate {gate_id}")
        self.entry_key = lock_entry
        if calibration:
            # Calibration comes before the lock: the protocol parameters come from the gate template.
            self.lock, self.entry = None, None
            self._parameters = gate_template_entry(lock_entry)["parameters"]
        else:
            self.lock = ThresholdLock.load(self.lock_path)  # refuses a tampered lock before any work
            self.entry = self.lock.entry(lock_entry)
            self._parameters = self.entry.parameters
        self.config = config
        self.seed = seed
        # HF Jobs backend (set by `covtoken submit`): the run id is the submitted one, results are uploaded as made
        self.hub: Any = None
        if backend is None and os.environ.get("COVTOKEN_BACKEND") == "hf-jobs":
            from .hubsync import HubSync

            self.hub = HubSync.from_environment()
            run_id = self.hub.claim_run_id(run_id)
        self.run_id = run_id or new_run_id(gate_id)
        if (self.results_dir / f"{self.run_id}.json").exists():
            raise FileExistsError(f"run {self.run_id} already has a record in {self.results_dir}; use a new run id")
        self.backend = dict(backend or (self.hub.backend() if self.hub else {"name": "local", "job_id": None}))
        self.device = device
        self.command = list(command) if command else [Path(sys.argv[0]).name, *sys.argv[1:]]
        self.code = code_state()
        self.started_at = utc_now()
        self._t0 = time.perf_counter()
        self.artefacts = ArtefactWriter(self.results_dir, self.run_id)
        self.notes: list[str] = []
        log.info(json.dumps({"event": "run_start", "run_id": self.run_id, "gate": gate_id, "entry": lock_entry,
                             "commit": self.code["commit"], "dirty": self.code["dirty"]}))

    @classmethod
    def for_gate(cls, gate_id: str, cfg: JobConfig, *, command: list[str], default_entry: str) -> "Run":
        """Open the run of a gate job from its config: ``--lock-entry`` if given, else ``<gate>/<default_entry>``."""
        return cls(gate_id=gate_id, results_dir=cfg.results, lock_entry=cfg.lock_entry or f"{gate_id}/{default_entry}",
                   lock_path=cfg.lock or default_lock_path(), config=cfg, seed=cfg.seed, run_id=cfg.run_id,
                   device=cfg.device, calibration=cfg.calibration, command=command)

    def sync_token_bank(self, bank_dir: str | Path) -> Callable[[Path], None] | None:
        """The ``on_shard`` callback for a token bank in ``bank_dir``; None on the local backend.

        Under HF Jobs the shards an earlier attempt of this run uploaded are downloaded into ``bank_dir`` first
        (the bank verifies them by hash and extracts only what is missing), and every new shard is uploaded.
        """
        if self.hub is None:
            return None
        restored = self.hub.restore_bank(bank_dir)
        if restored:
            self.notes.append(f"resumed: {restored} token-bank shard(s) of {Path(bank_dir).name} restored from "
                              f"{self.hub.prefix}/bank/ (attempt {self.hub.env.attempt})")
        return self.hub.bank_uploader(bank_dir)

    @property
    def parameters(self) -> Mapping[str, Any]:
        """The locked protocol parameters of the entry (label rule, CI level, resamples...)."""
        return self._parameters

    def finish(self, *, metrics: dict, backbone: dict, dataset: dict, sample_run: bool = False) -> Path:
        """Judge ``metrics`` under the locked entry and write the record; returns its path."""
        if self.entry is None:
            raise RuntimeError("a calibration run is never judged; use write_calibration")
        decision, criteria, reason = judge(self.entry.criteria, metrics)
        rt = runtime(self.device)
        finished = utc_now()
        record = {
            "record_type": "covtoken.gate_record",
            "schema_version": 1,
            "run_id": self.run_id,
            "gate_id": self.gate_id,
            "claim": self.entry.claim,
            "decision": decision,
            "decision_reason": reason,
            "sample_run": sample_run,
            "criteria": criteria,
            "metrics": metrics,
            "lock": self.lock.record_stamp(self.entry.key, _display_path(self.lock_path)),
            "provenance": {
                "code": self.code,
                "packages": package_versions(),
                **rt,
                "backbone": backbone,
                "dataset": dataset,
                "seed": self.seed,
                "started_at": self.started_at,
                "finished_at": finished,
                "wall_seconds": round(time.perf_counter() - self._t0, 3),
                "backend": self.backend,
                "command": self.command,
                "config": json.loads(dumps_strict(dataclasses.asdict(self.config))),
                "parameters": json.loads(dumps_strict(dict(self.parameters))),
            },
            "artefacts": self.artefacts.entries,
            "notes": self.notes,
        }
        path = write_record(record, self.results_dir)
        log.info(json.dumps({"event": "record_written", "path": str(path), "decision": decision}))
        if self.hub is not None:
            self.hub.publish_record(path)  # artefacts and record in one commit, after everything else
        return path

    def write_calibration(self, *, metrics: dict, backbone: dict, dataset: dict) -> Path:
        """Calibration runs are not judged: write their metrics for ``covtoken thresholds calibrate``."""
        doc = {"kind": "covtoken.calibration_run", "gate_id": self.gate_id, "entry": self.entry_key,
               "run_id": self.run_id, "metrics": metrics, "backbone": backbone, "dataset": dataset,
               "code": self.code, "started_at": self.started_at, "finished_at": utc_now(),
               "config": json.loads(dumps_strict(dataclasses.asdict(self.config)))}
        path = write_json_atomic(self.results_dir / "calibration" / f"{self.run_id}.json", doc)
        if self.hub is not None:
            self.hub.publish_file(path, f"calibration/{self.run_id}.json")
        return path


def _display_path(p: Path) -> str:
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()
