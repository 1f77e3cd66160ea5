"""What a LOSO experiment is, as plain values: its configuration, the two variants it evaluates per
record, the statistics it headlines, and the base models and per-record results it produces.

:mod:`ecg_mlflow.loso` runs the experiment and :mod:`ecg_mlflow.resume` reads finished runs back
into these types. ``loso`` imports ``resume``, and both import from here, so there is no cycle.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from ecg_mlflow.beats import r_index
from ecg_mlflow.dataset import PrepareConfig
from ecg_mlflow.executors import ExecConfig
from ecg_mlflow.models import check_core_window, check_kernel_size
from ecg_mlflow.training import TrainConfig

VARIANTS = ("no_transfer", "transfer")
EVALUATE_ON = ("test", "validation")
HEADLINE = ("veb_se", "veb_ppv", "veb_fpr", "sveb_se", "sveb_ppv", "sveb_fpr", "accuracy", "macro_f1")


@dataclass(frozen=True)
class LosoConfig:
    """Everything a LOSO run needs, as plain values."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    holdout: str | None = None  # subjects to hold out, comma-separated; None/'all' = every subject
    registry_prefix: str = "ecg"
    register: bool = True
    execution: ExecConfig = field(default_factory=ExecConfig)
    resume_run_id: str | None = None  # re-open this LOSO run and finish what it left undone
    base_folds: int = 0  # 0: one base model per held-out subject; k >= 2: k groups of subjects share one
    evaluate_on: str = "test"  # test | validation (second half of the fine-tune minutes; for model choice)
    base_run_id: str | None = None  # take this LOSO run's base models instead of training them

    def validated(self) -> "LosoConfig":
        self.prepare.validated()
        self.train.validated()
        self.execution.validated()
        # The core window needs the R peak's place, which the data's window and offset give.
        check_core_window(self.train.core_window, self.prepare.window,
                          r_index(self.prepare.window, self.prepare.window_offset))
        check_kernel_size(self.train.kernel_size, self.prepare.window, self.train.core_window)
        if self.train.augment_shift > self.prepare.window // 4:
            raise ValueError(f"augment_shift must be at most a quarter of the window ({self.prepare.window // 4} "
                             f"samples for window {self.prepare.window}), got {self.train.augment_shift!r}")
        if isinstance(self.base_folds, bool) or not isinstance(self.base_folds, int) or self.base_folds < 0 \
                or self.base_folds == 1:
            raise ValueError(f"base_folds must be 0 (one base model per subject) or a whole number >= 2, "
                             f"got {self.base_folds!r}")
        if self.evaluate_on not in EVALUATE_ON:
            raise ValueError(f"evaluate_on must be one of {list(EVALUATE_ON)}, got {self.evaluate_on!r}")
        if not self.registry_prefix or not all(c.isalnum() or c in "-_." for c in self.registry_prefix):
            raise ValueError(f"registry_prefix must be letters, digits, '-', '_' or '.', got {self.registry_prefix!r}")
        for name in ("resume_run_id", "base_run_id"):
            value = getattr(self, name)
            if value and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
                raise ValueError(f"{name} must be a run id (letters and digits), got {value!r}")
        return self

    def params(self) -> dict[str, object]:
        """Flat parameters for ``mlflow.log_params``."""
        p = {k: v for k, v in asdict(self.prepare).items() if k not in ("cache_dir", "download")}
        p.update(asdict(self.train))
        p.update(holdout=self.holdout or "all", registry_prefix=self.registry_prefix, base_folds=self.base_folds,
                 evaluate_on=self.evaluate_on, base_run_id=self.base_run_id)
        p.update(self.execution.params())
        return {k: ("" if v is None else v) for k, v in p.items()}

    @property
    def registers(self) -> bool:
        """Models go to the registry only from runs evaluated on test segments: validation runs
        exist to choose options, their models are not the experiment's."""
        return self.register and self.evaluate_on == "test"


@dataclass
class BaseModel:
    """A trained base model and where it was logged."""

    model: object
    subject: str
    run_id: str
    model_uri: str
    train_records: tuple[str, ...]


@dataclass
class PatientResult:
    """One (record, variant) evaluated: its test metrics and its confusion matrix ``(n_classes, n_classes)``."""

    record: str
    variant: str
    run_id: str
    metrics: dict[str, float]
    cm: np.ndarray

