"""Schemathesis fuzzes every operation of the OpenAPI schema against a real `lockstep serve`: no 5xx, ever.

The server runs a tiny model over a small corpus with an admin token, so the
admin and job routes are exercised past authentication; jobs go to an embedded
queue no worker reads, so fuzzed retrains are recorded but never run.
"""

from __future__ import annotations

import signal

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis.generation import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from indexer.corpus_store import CorpusStore
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from tests.conftest import SAMPLE_DOCS
from tests.processes import start_server

pytestmark = pytest.mark.integration

TOKEN = "fuzz-admin-token-0123456789"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_model_dir):
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    releases = ReleaseStore(data_dir)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    corpus.close()
    process, base = start_server(data_dir, admin_token=TOKEN)
    yield schemathesis.openapi.from_url(f"{base}/openapi.json")
    process.send_signal(signal.SIGINT)
    process.wait(timeout=20)


def _fuzz(operation, mode: GenerationMode) -> str | None:
    """Run one operation's generated cases (valid or invalid by `mode`); the first failure's report, or None."""

    @hypothesis.given(case=operation.as_strategy(mode))
    @hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
                         database=None)
    def run(case):
        case.call_and_validate(
            headers={"Authorization": f"Bearer {TOKEN}"},
            checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
        )

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        return None  # the operation takes no input that could be made invalid
    except Exception as exc:
        return f"{operation.label} ({mode.value}): {exc}"
    return None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_operation_answers_5xx_or_off_schema(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) > 10
    failures = [failure for failure in (_fuzz(operation, mode) for operation in operations) if failure]
    assert not failures, "\n\n".join(failures)
