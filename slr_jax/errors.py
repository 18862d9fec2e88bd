"""The errors slr_jax raises for a user's mistake or a broken input.

Each names the culprit and what to do in its message. Every entry point runs through
``slr_jax.cli.run_cli``, which prints such an error as one ``error:`` line and exits with its
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SlrJaxError(Exception):
    """Base of every error caused by the user's config, files or command line."""

    exit_code = 1


class FlagError(SlrJaxError, ValueError):
    """A command-line flag is unknown, missing or malformed (exit status 2)."""

    exit_code = 2


class ConfigError(SlrJaxError, ValueError):
    """The config has unknown keys or values the code cannot use."""


class DataError(SlrJaxError, ValueError):
    """The dataset folder, a list file or an image is missing, unreadable or inconsistent."""


class CheckpointError(SlrJaxError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


class InferenceError(SlrJaxError, ValueError):
    """Inference inputs (images, folders, settings) are missing, unreadable or inconsistent."""


class EvaluationError(SlrJaxError, ValueError):
    """Label maps are missing, unreadable, of the wrong shape or hold out-of-range labels."""


class TrainingError(SlrJaxError, RuntimeError):
    """Training cannot go on (non-finite loss, bad initial checkpoint, batch size)."""


class PretrainError(SlrJaxError, RuntimeError):
    """Backbone pretraining cannot run or went wrong (bad settings, non-finite loss)."""


class StorageError(SlrJaxError, RuntimeError):
    """A folder cannot be written: the disk is full, read-only or not the user's."""


class Preempted(Exception):  # noqa: N818 - a signal to stop, not an error of the user's
    """SIGTERM arrived and the state was saved: the run stops and resumes when rerun."""
