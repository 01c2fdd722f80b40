"""Reference trainer: Symile vs CLIP on synthetic data with higher-order
structure, or on the user's own precomputed features.

Run it as ``python -m symile_kernels.train`` (or the console script
``symile-train``); ``--help`` lists the options. The data-generating processes
are documented in ``symile_kernels.train.data``, the encoders in ``.model``,
training and zero-shot evaluation in ``.loop`` and the outputs in ``.report``.
Task ``features`` reads files through ``.feature_files``, checks and splits
them in ``.features`` and reports retrieval metrics from ``.retrieval``;
``python -m symile_kernels.train.make_features`` writes an example file.

In Python::

    from symile_kernels.train import RunConfig, train_run
    entry, model = train_run(RunConfig(task="xor", loss="symile", p_hat=1.0))
    entry["test_accuracy"]
"""
from .loop import ConfigError, RunConfig, evaluate, evaluate_checkpoint, save_checkpoint, train_run, train_step

__all__ = ["RunConfig", "ConfigError", "train_run", "train_step", "evaluate", "evaluate_checkpoint",
           "save_checkpoint"]
