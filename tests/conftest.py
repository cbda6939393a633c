"""Shared fixtures: real ML-100K through the project's own fetch path, prepared once per session."""
from __future__ import annotations

import os
import tempfile

import pytest

from hybrid.data.fetch import fetch_movielens_100k
from hybrid.data.protocols import ProtocolConfig, prepare
from hybrid.data.readers import read_movielens

# The library logs with MLflow. Its default store is ./mlflow.db of the working directory; a test that names
# none writes to a store of the test session's own (subprocesses inherit it), never the user's or the
# repository's. Tests of the default itself unset this variable.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='hybrid-tests-')}/mlflow.db"


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory):
    """ML-100K: ../shared/data when it is there, else the files inside the recbole wheel on PyPI."""
    return fetch_movielens_100k(tmp_path_factory.mktemp("data") / "ml-100k")


@pytest.fixture(scope="session")
def ml100k(ml100k_dir):
    return read_movielens(ml100k_dir)


@pytest.fixture(scope="session")
def prepared_last_item(ml100k):
    return prepare(ml100k, ProtocolConfig(protocol="last-item"))


@pytest.fixture(scope="session")
def prepared_ratings(ml100k):
    return prepare(ml100k, ProtocolConfig(protocol="ratings"))


@pytest.fixture(scope="session")
def prepared_last_item_dir(prepared_last_item, tmp_path_factory):
    """``prepared_last_item`` written as a prepared directory (what ``hybrid pretrain`` reads)."""
    from dataclasses import replace

    from hybrid.data.store import save_prepared

    # a copy of stats: saving adds the data hash, and the shared fixture stays as the protocol left it
    copy = replace(prepared_last_item, stats=dict(prepared_last_item.stats))
    return save_prepared(copy, tmp_path_factory.mktemp("prepared") / "last-item")


@pytest.fixture(scope="session")
def prepared_ratings_dir(prepared_ratings, tmp_path_factory):
    """``prepared_ratings`` written as a prepared directory."""
    from dataclasses import replace

    from hybrid.data.store import save_prepared

    copy = replace(prepared_ratings, stats=dict(prepared_ratings.stats))
    return save_prepared(copy, tmp_path_factory.mktemp("prepared") / "ratings")
