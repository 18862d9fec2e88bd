"""Builds one of slr_jax's tfds datasets from files downloaded by hand (nothing is downloaded).

    python -m slr_jax.data.build voc_sbd --manual_dir /data/voc_raw --data_dir /data/tfds
    python -m slr_jax.data.build coco_seg/2014 --manual_dir /data/coco --data_dir gs://B/tfds

A thin command line over ``tfds.builder(...).download_and_prepare`` in the array_record format
that the pipeline reads by index (``slr_jax/data/pipeline.py``). Written here rather than
pointing at ``tfds build``: that command imports apache_beam, which is not a requirement.
Building is idempotent: a prepared dataset is left as it is. docs/data.md lists the files each
builder expects in ``manual_dir``.
"""

from __future__ import annotations

import os
import sys

from slr_jax import cli
from slr_jax.data import builders  # noqa: F401  (registers the builders with tfds)
from slr_jax.data.voc import DataError

BUILDERS = ("voc_sbd", "coco_seg", "synthetic_shapes")
# Builders that read the user's files; synthetic_shapes generates its examples.
NEEDS_MANUAL_DIR = ("voc_sbd", "coco_seg")


def prepare(name: str, data_dir: str = "", manual_dir: str = ""):
    """The prepared tfds builder ``name`` ('voc_sbd', 'coco_seg/2014', ...) under ``data_dir``
    (tfds' default when empty), built from ``manual_dir`` first if needed (array_record)."""
    import tensorflow_datasets as tfds

    base = name.split("/")[0].split(":")[0]
    if base not in BUILDERS:
        raise DataError(f"unknown dataset {name!r}; slr_jax builds {list(BUILDERS)}.")
    builder = tfds.builder(name, data_dir=data_dir or None)
    if builder.is_prepared():
        return builder
    if base in NEEDS_MANUAL_DIR:
        if not manual_dir:
            raise DataError(
                f"{name} is built from files you download by hand: pass their folder "
                "(--manual_dir, or config.dataset.manual_dir); docs/data.md lists them."
            )
        if not os.path.isdir(os.path.expanduser(manual_dir)) and "://" not in manual_dir:
            raise DataError(f"manual_dir {manual_dir!r} does not exist or is not a folder.")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    before = _folders(builder.data_dir_root)
    try:
        builder.download_and_prepare(download_config=config, file_format="array_record")
    except AssertionError as error:  # tfds' own check, e.g. a split that yielded nothing
        _remove_new_empty_folders(builder.data_dir_root, before)
        first = (str(error).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".:")
        raise DataError(
            f"building {name} failed: {first}; docs/data.md lists the files it needs."
        ) from None
    except BaseException:
        _remove_new_empty_folders(builder.data_dir_root, before)
        raise
    return builder


def _folders(root: str) -> set[str]:
    """Every folder under ``root`` (local paths; none for gs://)."""
    if "://" in str(root) or not os.path.isdir(root):
        return set()
    return {dirpath for dirpath, _, _ in os.walk(root)}


def _remove_new_empty_folders(root: str, before: set[str]) -> None:
    """Removes the folders a failed build created and left empty (deepest first), and
    ``root`` itself when the build created it; never a folder that holds a file."""
    root = str(root)
    created = sorted(_folders(root) - before, key=len, reverse=True)
    for folder in created:
        if not os.listdir(folder):
            os.rmdir(folder)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m slr_jax.data.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", help=f"one of {', '.join(BUILDERS)} (optionally NAME/CONFIG)")
    parser.add_argument("--manual_dir", default="", help="folder with the downloaded files")
    parser.add_argument("--data_dir", default="", help="where tfds writes the dataset")
    args = parser.parse_args(argv)
    try:
        builder = prepare(args.name, args.data_dir, args.manual_dir)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return cli.EXIT_USER_ERROR
    splits = ", ".join(f"{k} {v.num_examples}" for k, v in sorted(builder.info.splits.items()))
    print(f"{builder.info.full_name} in {builder.data_dir}: {splits}")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
