"""The study folder: claiming it, atomic writes, committing a phase, and what resume discards."""

import json

import numpy as np
import pytest

from sm2jax.store.folder import StudyDir, read_json, write_json


def test_claim_writes_the_spec_and_refuses_a_different_one_once_the_study_has_run(tmp_path):
    folder = StudyDir(tmp_path / "s")
    folder.claim({"a": 1, "b": np.int64(2)})
    assert json.loads((tmp_path / "s" / "spec.json").read_text()) == {"a": 1, "b": 2}
    folder.claim({"a": 1, "b": 2})  # the same spec: nothing to do
    folder.claim({"a": 3})  # never ran: a corrected spec replaces it
    assert folder.spec_blob() == {"a": 3}
    (tmp_path / "s" / "ledger.jsonl").write_text("{}\n")  # an empty one (a failed start) would not count
    assert folder.has_run()
    with pytest.raises(ValueError, match=r"already holds a study with a different spec \(differs in: a\)"):
        folder.claim({"a": 4})
    folder.claim({"a": 3, "new": None}, normalise=lambda held: {**held, "new": None})  # a field added since
    assert folder.spec_blob() == {"a": 3}


def test_writes_are_atomic_and_unreadable_json_names_its_file(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": np.float32(0.5), "a": np.arange(2)})
    assert read_json(path) == {"v": 0.5, "a": [0, 1]} and not (tmp_path / "x.json.tmp").exists()
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json is not valid JSON"):
        read_json(path)


def test_results_errors_say_whether_the_study_is_missing_or_unfinished(tmp_path):
    with pytest.raises(FileNotFoundError, match="no study in"):
        StudyDir(tmp_path / "nothing").results()
    folder = StudyDir(tmp_path / "s")
    folder.claim({"a": 1})
    with pytest.raises(FileNotFoundError, match="has not finished"):
        folder.results()
    folder.write_results({"selected": None})
    assert folder.results() == {"selected": None}


def test_a_phase_commits_its_checkpoint_before_its_progress_and_resume_discards_later_ones(tmp_path):
    folder = StudyDir(tmp_path / "s")
    folder.claim({"a": 1})
    checkpoints = folder.checkpoints()
    try:
        rows = {"cohort": {"w": np.arange(3.0)}}
        folder.commit_phase(0, {"phase": 0}, checkpoints, rows)
        folder.commit_phase(1, {"phase": 1}, checkpoints, rows)
        folder.commit_phase(2, {"phase": 2}, checkpoints, {})  # no survivor: no checkpoint
        assert folder.saved_phases() == [0, 1, 2] and checkpoints.steps() == [0, 1]
        assert folder.load_progress(1) == {"phase": 1}
        checkpoints.save(3, rows)  # a kill between a checkpoint and its progress record
        checkpoints.wait()
        with pytest.warns(RuntimeWarning, match="checkpoint of phase 3 has no progress record"):
            folder.discard_after(0, checkpoints)
        assert folder.saved_phases() == [0] and checkpoints.steps() == [0]
    finally:
        checkpoints.close()


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_spec(tmp_path):
    """A first start that failed after claiming the folder left empty checkpoints/ and progress/
    folders and an empty ledger: the study never ran, so a corrected spec replaces it."""
    folder = StudyDir(tmp_path / "s")
    folder.claim({"a": 1})
    (tmp_path / "s" / "checkpoints").mkdir()
    (tmp_path / "s" / "ledger.jsonl").write_text("")
    assert not folder.has_run()
    folder.claim({"a": 2})
    assert folder.spec_blob() == {"a": 2}
