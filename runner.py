"""What every job script shares: layered frozen config, the run context, and writing the one record.

A job declares its config as a frozen dataclass. :func:`load_config` merges, in order, the dataclass
defaults, an optional JSON experiment file (``--config``), and command-line overrides; unknown keys are
rejected. :class:`Run` opens a run (run id, start time, code state, results folder), collects artefacts,
judges the metrics under the locked entry and writes the record atomically at the end. The record is the
only output a gate decision lives in.
"""
from __future__ import annotations

import argparse
import contextvars
import dataclasses
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from .lock import DEFAULT_LOCK_PATH, LockError, ThresholdLock, gate_template_entry, judge
from .provenance import code_state, package_versions, runtime
from .record import (ArtefactWriter, RecordError, dumps_strict, loads_strict, new_run_id, sealed_fields, utc_now,
                     write_json_atomic, write_record)
from .threads import torch_threads

__all__ = ["load_config", "add_config_arguments", "Run", "stage", "torch_threads", "default_lock_path", "ConfigError",
           "JobConfig", "job_main", "load_gate_dataset"]

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


#: the Run a job body opened (job_main marks it refused when a user error stops it before the compute)
_OPEN_RUN: "contextvars.ContextVar[Any]" = contextvars.ContextVar("covtoken_open_run", default=None)


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

    parser = OneLineParser(prog=Path(script).name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, cls)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if os.environ.get("COVTOKEN_DEBUG_HTTP") != "1":  # httpx logs every Hub request at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    command = [script, *[a for a in argv if a != "--debug"]]

    def body() -> int:
        cfg = apply_smoke(load_config(cls, args), smoke, explicit=explicit_keys(cls, args))
        validate_config(cfg)
        token = _OPEN_RUN.set(None)
        try:
            return int(run(cfg, command=command))
        except Exception as exc:
            opened = _OPEN_RUN.get()
            if opened is not None and getattr(exc, "exit_status", None) == 2:
                opened.refuse(exc)  # refused before the compute: in the ledger as such, nothing staged left
            raise
        finally:
            _OPEN_RUN.reset(token)

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
    """Load a gate's dataset with its locked options (a ``covtoken.data.catalog.LoadedDataset``), then run the
    data checks (:func:`covtoken.data.checks.run_data_checks`: near-duplicate split units, enough patients in every
    judged split) before the job touches a backbone.

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
    from .data.checks import run_data_checks

    opts = dict(params.get("dataset_options", {}) if options is None else options)
    if is_embedded(dataset):
        opts["seed"] = cfg.seed + (int(params["calibration_seed_offset"]) if cfg.calibration else 0)
        seen = params.get("backbone_pretraining_seeds") or []
        if opts["seed"] in seen:
            from .evidence import EvidenceError

            raise EvidenceError(f"--seed {cfg.seed}: generator seed {opts['seed']} drew the phantoms this entry's "
                                f"backbone ({params.get('backbone')}) was pretrained on (locked "
                                f"backbone_pretraining_seeds {sorted(seen)}); judge it on unseen patients "
                                f"(another --seed)")
    if root:
        opts["root"] = root
    with stage("load_data", dataset=dataset):
        data = load_dataset(dataset, **opts)
    # identity is checked by the loader; near-duplicate units and split sizes here, before any backbone work
    with stage("data_checks", dataset=dataset):
        return run_data_checks(data, params, seed=cfg.seed, dataset=dataset, embedded=is_embedded(dataset))


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
        check_entry_backbone(lock_entry, self._parameters, getattr(config, "backbone", None))
        self.config = config
        self.seed = seed
        # HF Jobs backend (set by `covtoken submit`): the run id is the submitted one, results are uploaded as made
        self.hub: Any = None
        if backend is None and os.environ.get("COVTOKEN_BACKEND") == "hf-jobs":
            from .hfjobs.hubsync import HubSync

            self.hub = HubSync.from_environment()
            run_id = self.hub.claim_run_id(run_id)
        self.run_id = run_id or new_run_id(gate_id)
        resumed = self._open_staging()
        self.backend = dict(backend or (self.hub.backend() if self.hub else {"name": "local", "job_id": None}))
        self.device = device
        self.command = list(command) if command else [Path(sys.argv[0]).name, *sys.argv[1:]]
        self.code = code_state()
        self.started_at = utc_now()
        self._t0 = time.perf_counter()
        self.artefacts = ArtefactWriter(self.staging, self.run_id)
        self.notes: list[str] = []
        self._evaluations: list[dict] = []
        self._evaluated: dict[str, Any] = {}
        self.evidence: str | None = None
        self._ledger("resume" if resumed else "start", lock_entry)
        _OPEN_RUN.set(self)
        log.info(json.dumps({"event": "run_start", "run_id": self.run_id, "gate": gate_id, "entry": lock_entry,
                             "commit": self.code["commit"], "dirty": self.code["dirty"]}))

    @classmethod
    def for_gate(cls, gate_id: str, cfg: JobConfig, *, command: list[str], default_entry: str | None = None,
                 upper: tuple[str, str] | None = None, variant: str | None = None) -> "Run":
        """Open the run of a gate job from its config.

        The lock entry is ``--lock-entry`` if given, else the one the run's evidence tier calls for
        (:func:`covtoken.evidence.default_entry_name`; ``default_entry`` is only a fallback for a gate whose lock
        has no such entry). A run that can only be a flow check (phantom data, or a backbone whose weights cannot
        be verified) is refused here, before any data or weights are read, when the entry judges more.

        ``upper`` replaces the upper bound computed from ``cfg.backbone`` for a job whose backbones are not the
        frozen-backbone option (G9: the arms of its classifier configs): ``(tier, why)`` with ``why`` naming what
        keeps it below ``real`` (see :func:`covtoken.evidence.weights_upper_bound`).

        ``variant`` names a protocol family with entries of its own (G8's ``3d``): the entry chosen without
        ``--lock-entry`` is then ``<name>-<variant>`` (``embedded-3d``, ``real-3d``), never the plain one.
        """
        from .evidence import allowed_entry, default_entry_name, is_phantom, upper_bound_tier

        datasets = _config_datasets(cfg)
        phantom = any(is_phantom(d) for d in datasets)
        why = ""
        if upper is not None:
            bound, why = upper
            bound = "flow-check" if phantom else bound
        else:
            bound = upper_bound_tier(datasets=datasets, backbone=cfg.backbone, weights=cfg.weights,
                                     revision=cfg.revision)
        entry = cfg.lock_entry
        if entry is None:
            lock_path = Path(cfg.lock) if cfg.lock else default_lock_path()
            try:
                names = sorted(ThresholdLock.load(lock_path).doc["gates"][gate_id]["entries"])
            except (LockError, RecordError, KeyError):  # the constructor below reports a bad lock or gate itself
                names = []
            name = default_entry_name(bound, phantom=phantom, entries=names)
            if variant:
                entry = f"{gate_id}/{name}-{variant}"
            else:
                if name == "embedded":  # a flow-check entry calibrated for this backbone (e.g. embedded-trained) wins
                    name = backbone_entry(gate_id, cfg.backbone, lock_path=lock_path,
                                          calibration=cfg.calibration) or name
                entry = f"{gate_id}/{name if name in names or default_entry is None else default_entry}"
        if not cfg.calibration and not any(allowed_entry(t, entry) for t in _TIERS_UP_TO[bound]):
            from .evidence import EvidenceError

            because = ("phantom data" if phantom else why) if upper is not None else (
                f"phantom data, or backbone {cfg.backbone!r} without pinned, digest-verified weights")
            raise EvidenceError(f"this run can only be a flow check ({because}); it cannot be judged under {entry}; "
                                f"use --lock-entry {gate_id}/embedded (or {gate_id}/sample on real files)")
        return cls(gate_id=gate_id, results_dir=cfg.results, lock_entry=entry,
                   lock_path=cfg.lock or default_lock_path(), config=cfg, seed=cfg.seed, run_id=cfg.run_id,
                   device=cfg.device, calibration=cfg.calibration, command=command)

    def check_weights(self, backbone: Any) -> None:
        """Right after a backbone is loaded, before any token work: a ``real`` entry needs weights that are a
        pinned, digest-verified pretrained checkpoint (``FrozenBackbone.weights_verified``); raises ``EvidenceError``."""
        from .evidence import EvidenceError, entry_tier

        if not self.calibration and entry_tier(self.entry_key) == "real" and not backbone.weights_verified:
            why = getattr(backbone, "weights_verification", (False, ""))[1]  # the reason, where the backbone gives it
            raise EvidenceError(f"this run is a flow-check (backbone {backbone.spec.name}: the loaded weights are not a "
                                f"pinned, digest-verified pretrained checkpoint{': ' + why if why else ''}); it cannot "
                                f"be judged under {self.entry_key}, which judges real runs")

    def check_evidence(self, *, backbone: Mapping[str, Any], dataset: Mapping[str, Any]) -> str:
        """Derive the run's evidence tier from its backbone and dataset provenance and check it against the entry.

        Jobs call it as soon as the data are split and the backbone is loaded, before any token work;
        :meth:`finish` calls it again on the provenance it writes. Raises ``EvidenceError`` (one line).
        """
        from .evidence import check_entry, facts_of

        facts = facts_of(backbone=backbone, dataset=dataset)
        if not self.calibration:
            check_entry(facts.tier, self.entry_key, why=facts.why)
        self.evidence = facts.tier
        return facts.tier

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

    def finish(self, *, metrics: dict, backbone: dict, dataset: dict) -> Path:
        """Judge ``metrics`` under the locked entry and write the record; returns its path.

        The record's evidence tier is derived from ``backbone`` and ``dataset`` (the provenance it stores) and must
        be one the entry judges, else nothing is written.
        """
        if self.entry is None:
            raise RuntimeError("a calibration run is never judged; use write_calibration")
        evidence = self.check_evidence(backbone=backbone, dataset=dataset)
        rt = runtime(self.device)
        finished = utc_now()
        provenance = {
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
        }
        self._seal_evaluation(metrics, sealed=sealed_fields(provenance, evidence=evidence, entry=self.entry_key))
        decision, criteria, reason = judge(self.entry.criteria, metrics)
        record = {
            "record_type": "covtoken.gate_record",
            "schema_version": 1,
            "run_id": self.run_id,
            "gate_id": self.gate_id,
            "claim": self.entry.claim,
            "decision": decision,
            "decision_reason": reason,
            "evidence": evidence,
            "criteria": criteria,
            "metrics": metrics,
            "lock": self.lock.record_stamp(self.entry.key, _display_path(self.lock_path)),
            "provenance": provenance,
            "artefacts": self.artefacts.entries,
            "notes": self.notes,
        }
        path = self._commit(record)
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
        self._discard_staging()  # a calibration run keeps no gate artefacts
        if self.hub is not None:
            self.hub.publish_file(path, f"calibration/{self.run_id}.json")
        return path

    # ------------------------------------------------------------- evaluation inputs, staging, ledger
    def evaluate(self, recipe: str, arrays: Mapping[str, Any], args: Mapping[str, Any]) -> Any:
        """Compute metrics through the named recipe and keep its inputs as an eval-only artefact.

        The arrays go to ``eval_inputs-<k>.npz`` and the call to ``evaluation.json`` (at :meth:`finish`), so the
        audit can recompute every metric the same way (``covtoken.eval.recompute``). Returns the recipe's
        :class:`~covtoken.eval.recompute.Evaluation`.
        """
        from .eval.recompute import canonical, evaluate, pack_arrays, unpack_arrays

        data = pack_arrays(arrays)
        ev = evaluate(recipe, unpack_arrays(data), args)  # exactly what the audit will load and recompute
        clash = sorted(set(ev.metrics) & set(self._evaluated))
        if clash:
            raise ValueError(f"recipe {recipe} produced metrics {clash} that an earlier evaluation already produced")
        name = f"eval_inputs-{len(self._evaluations)}.npz"
        if not self.calibration:
            self.artefacts.bytes(name, data, description=(
                f"evaluation inputs of recipe {recipe} (eval-only; the audit recomputes the metrics from them)"))
        self._evaluations.append({"recipe": recipe, "args": canonical(dict(args)), "inputs": name,
                                  "metrics": sorted(ev.metrics)})
        self._evaluated.update(ev.metrics)
        return ev

    def _seal_evaluation(self, metrics: Mapping[str, Any], *, sealed: Mapping[str, Any]) -> None:
        """Check that every record metric came out of :meth:`evaluate` unchanged; write ``evaluation.json``.

        ``sealed`` holds the record fields the audit cannot recompute (provenance, seed, notes...); the audit
        requires the record to carry exactly these values, so a record edited after the run no longer matches.
        """
        from .eval.recompute import compare_metrics

        if not self._evaluations:
            log.warning(json.dumps({"event": "no_evaluation_inputs", "run_id": self.run_id,
                                    "detail": "metrics were not computed through Run.evaluate; the audit will fail"}))
            return
        diffs = compare_metrics(self._evaluated, metrics)
        if diffs:
            raise RuntimeError(f"run {self.run_id}: the record's metrics are not the ones its recipes computed: "
                               + "; ".join(diffs[:5]))
        self.artefacts.json("evaluation.json", {
            "kind": "covtoken.evaluation", "evaluations": self._evaluations, "notes": list(self.notes),
            "sealed": dict(sealed)}, description="how every metric was computed: recipe, arguments and input "
            "file per call, plus the run's notes and provenance as written (the audit recomputes and compares)")

    @property
    def staging(self) -> Path:
        from .runstore import staging_dir

        return staging_dir(self.results_dir, self.run_id)

    def _open_staging(self) -> bool:
        """Refuse a finished run id, finish an interrupted commit, or resume a staged run; True when resuming."""
        import shutil

        from .runstore import recover_commit

        if (self.results_dir / f"{self.run_id}.json").exists():
            recover_commit(self.results_dir, self.run_id)  # removes staging leftovers of a finished run
            raise FileExistsError(f"run {self.run_id} already has a record in {self.results_dir}; use a new run id")
        if recover_commit(self.results_dir, self.run_id) is not None:
            raise FileExistsError(f"run {self.run_id} had finished; its interrupted commit into {self.results_dir} "
                                  "was completed now")
        orphan = self.results_dir / "artefacts" / self.run_id
        if orphan.exists():
            raise FileExistsError(f"{orphan}: artefacts of run {self.run_id} exist without a record (written outside "
                                  "staging); remove the folder to rerun it")
        resumed = self.staging.exists()
        if resumed:
            shutil.rmtree(self.staging)  # a killed attempt: its partial artefacts are recomputed
        self.staging.mkdir(parents=True)  # visible to the audit as an unfinished run until the commit
        return resumed

    def refuse(self, exc: BaseException) -> None:
        """Mark the run as refused before the compute (a data, evidence or config check stopped it with exit 2).

        The ledger gets a ``refused`` entry with the reason, so the audit does not count the run as a missing
        record (it was never a result), and staged files are removed. A crash or any other error leaves the ledger
        as it is: that run stays listed as started without a record.
        """
        from .runstore import append_ledger

        if (self.results_dir / f"{self.run_id}.json").exists():
            return
        self._discard_staging()
        append_ledger(self.results_dir, {"event": "refused", "run_id": self.run_id, "gate_id": self.gate_id,
                                         "time": utc_now(), "reason": " ".join(str(exc).split())[:500]})

    def _ledger(self, event: str, lock_entry: str) -> None:
        from .runstore import append_ledger, config_digest, read_ledger

        if event == "start" and any(e["run_id"] == self.run_id for e in read_ledger(self.results_dir)):
            event = "resume"  # killed before anything was staged: still the same run
        append_ledger(self.results_dir, {
            "event": event, "run_id": self.run_id, "gate_id": self.gate_id, "entry": lock_entry,
            "time": self.started_at, "commit": self.code["commit"], "calibration": self.calibration,
            "command_sha256": config_digest(self.command),
            "config_sha256": config_digest(json.loads(dumps_strict(dataclasses.asdict(self.config)))
                                           if dataclasses.is_dataclass(self.config) else repr(self.config))})

    def _commit(self, record: dict) -> Path:
        from .runstore import DiskWriteError, commit_run

        try:
            write_record(record, self.staging)
            return commit_run(self.results_dir, self.run_id)
        except OSError as exc:
            if isinstance(exc, (FileExistsError, DiskWriteError)) or exc.errno is None:
                raise
            where = exc.filename or self.staging
            raise DiskWriteError(exc.errno, f"{where}: cannot write run {self.run_id}: {exc.strerror}") from None

    def _discard_staging(self) -> None:
        import shutil

        if self.staging.exists():
            shutil.rmtree(self.staging)
        try:
            self.staging.parent.rmdir()
        except OSError:
            pass


_TIERS_UP_TO = {"flow-check": ("flow-check",), "sample": ("flow-check", "sample"),
                "real": ("flow-check", "sample", "real")}


def backbone_entry(gate_id: str, backbone: str, *, lock_path: str | Path, calibration: bool) -> str | None:
    """The flow-check entry of ``gate_id`` whose locked (for calibration: templated) parameters name ``backbone``
    (``parameters.backbone``, e.g. ``embedded-trained`` for ``tiny-vit-lejepa``); None when there is none."""
    try:
        if calibration:
            from .lock import gate_template

            entries = gate_template(gate_id)["entries"]
        else:
            entries = ThresholdLock.load(lock_path).doc["gates"][gate_id]["entries"]
    except (LockError, RecordError, KeyError, OSError):  # the run's own lock check reports a bad lock or gate
        return None
    names = sorted(n for n, e in entries.items() if (e.get("parameters") or {}).get("backbone") == backbone
                   and n not in ("real", "sample"))
    return names[0] if len(names) == 1 else None


def check_entry_backbone(entry_key: str, parameters: Mapping[str, Any], backbone: str | None) -> None:
    """An entry whose parameters name a ``backbone`` judges (and calibrates) that backbone only: its thresholds were
    calibrated on it. Raises ``EvidenceError`` (one line, exit 2) before any work."""
    want = parameters.get("backbone")
    if want is not None and backbone != want:
        from .evidence import EvidenceError

        raise EvidenceError(f"--backbone {backbone}: lock entry {entry_key} was calibrated on backbone {want} and "
                            f"judges it only; use --backbone {want} or another --lock-entry")


def _config_datasets(cfg: Any) -> list[str]:
    """The dataset names a job config names: ``dataset``, or the ``modality=dataset`` pairs of ``datasets``."""
    out = []
    if isinstance(getattr(cfg, "dataset", None), str):
        out.append(cfg.dataset)
    for pair in getattr(cfg, "datasets", None) or ():
        out.append(str(pair).partition("=")[2] or str(pair))
    return out


def _display_path(p: Path) -> str:
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def write_model_card(results: str | Path, run_id: str, text: str) -> Path:
    """Write a run's model card to ``<results>/model_cards/<run_id>.md`` (beside the record, not an artefact: it is
    generated from the record and can be regenerated from it); returns its path."""
    path = Path(results) / "model_cards" / f"{run_id}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
