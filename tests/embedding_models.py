"""A private repository holding only the embedding models (encoder variants + the text pipeline) of the
main repository, as symlinks: the embedding tests start in seconds and do not depend on other models."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from export.specs import MINILM_TEXT
from serve.paths import MODEL_REPOSITORY
from tests.server_fixtures import start_server


def embedding_model_dirs(repo: Path = MODEL_REPOSITORY) -> list[Path]:
    """Model directories whose name starts with the encoder's name (minilm, minilm_int8, minilm_text, ...)."""
    prefix = MINILM_TEXT.encoder.name
    return sorted(d for d in repo.iterdir() if d.is_dir() and (d / "config.pbtxt").is_file()
                  and (d.name == prefix or d.name.startswith(prefix + "_")))


def link_repo(dst: Path, dirs: list[Path]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        os.symlink(d, dst / d.name)
    return dst


@contextlib.contextmanager
def embedding_server(tmp: Path):
    with start_server(link_repo(tmp / "repo", embedding_model_dirs())) as server:
        yield server
