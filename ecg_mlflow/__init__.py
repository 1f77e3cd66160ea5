"""ecg-mlflow: patient-specific ECG beat classification with transfer learning, tracked in MLflow.

Modules, in the order data flows through them:

- ``records``  — locate, download, validate and read WFDB records (fixed lead order, resampling).
- ``filters``  — optional signal filters (baseline wander, mains hum) applied to a record before its beats are cut.
- ``labels``   — label schemes (``aami``, ``raw``) with fixed class codes.
- ``beats``    — one window per reference beat annotation, with RR-interval context.
- ``splits``   — subjects, the fine-tune/test time split, leave-one-subject-out folds.
- ``dataset``  — the prepared, cached beat table (Parquet) and its MLflow dataset record.
- ``models``   — Keras model builders.
- ``training`` — base training and transfer (fine-tuning the head).
- ``metrics``  — confusion matrices, accuracy, macro-F1, AAMI EC57 VEB/SVEB statistics.
- ``tracking`` — MLflow logging helpers (figures, confusion matrices, models).
- ``registry`` — model-registry entries per patient.
- ``loso``     — the leave-one-subject-out experiment.
- ``compare``  — transfer against no-transfer across patients.
- ``classify`` — a logged model applied to a record's beats (reference or detected).
- ``selection`` — the cross-fitted choice among option sets (``select``); ``nested`` makes the
  runs it needs, end to end.

Around them: ``executors`` (where folds run), ``server`` (a local tracking server), ``lifetime``
(child processes that end with a killed parent), ``cli`` (the entry points' plumbing).
"""

__version__ = "0.1.0"
