"""A damaged journal: every command names the bad line and the way out, and `basin repair` rewrites
the journal with every valid operation, keeping the original."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search import journal, records
from search.cli import main
from search.config import ConfigError, config_from_dict
from search.setup import setup_study
from search.space import suggest
from tests.support.fault_zoo import study_config

GARBAGE = [b"this line was typed by hand\n", b"\x00\xff\xfe binary junk\n", b"42\n"]


@pytest.fixture(scope="module")
def pristine(fault_zoo, tmp_path_factory) -> Path:
    """A journal study with complete and failed trials, made once (copy it before changing it)."""
    folder = tmp_path_factory.mktemp("journal") / "night"
    s = setup_study(
        config_from_dict(study_config(fault_zoo, folder, baselines=False)), resume=False
    )
    for n in range(4):
        t = s.study.ask()
        suggest(t, s.space)
        if n == 2:
            s.study.tell(t, state=TrialState.FAIL)
        else:
            s.study.tell(t, [0.1 * n, 0.2])
    return folder


@pytest.fixture
def study(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "night"))


def lines(folder: Path) -> list[bytes]:
    return (folder / records.JOURNAL_FILE).read_bytes().splitlines(keepends=True)


def damage(folder: Path) -> bytes:
    """Garbage after the 2nd, 5th and last operations; returns the damaged file."""
    ops = lines(folder)
    assert len(ops) > 6
    damaged = [*ops[:2], GARBAGE[0], *ops[2:5], GARBAGE[1], *ops[5:], GARBAGE[2]]
    data = b"".join(damaged)
    (folder / records.JOURNAL_FILE).write_bytes(data)
    return data


def status(folder: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["status", str(folder)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_garbage_lines_make_every_command_name_the_line_and_the_way_out(study, capsys):
    damage(study)
    rc, out, err = status(study, capsys)
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("basin: error: ")
    assert str(study / records.JOURNAL_FILE) in err
    assert "line 3 is not a journal operation ('this line was typed by hand')" in err
    assert "one of 3 such lines (3, 7, " in err
    assert f"`basin repair {study}`" in err and "journal.log.bak-" in err
    assert "delete those lines by hand" in err
    assert "Traceback" not in err and "server" not in err and "driver" not in err
    for command in (["pareto", str(study)], ["export", str(study), "--trial", "0", "--out", "x"]):
        assert main(command) == 2
        assert "basin repair" in capsys.readouterr().err


def test_resume_names_the_damaged_journal_too(fault_zoo, study):
    damage(study)
    config = config_from_dict(study_config(fault_zoo, study, baselines=False))
    with pytest.raises(ConfigError, match=r"journal\.log: line 3 .* `basin repair"):
        setup_study(config, resume=True)
    assert study.is_dir()  # a failed resume leaves the study where it was


def test_repair_keeps_every_operation_and_the_original(study, capsys):
    rc, before, _ = status(study, capsys)
    assert rc == 0
    intact = (study / records.JOURNAL_FILE).read_bytes()
    damaged = damage(study)

    assert main(["repair", str(study)]) == 0
    out = capsys.readouterr().out
    kept = len(intact.splitlines())
    assert f"dropped 3 bad lines, kept {kept} operations" in out
    assert "study 'night' loads: 4 trials" in out
    (backup,) = study.glob(f"{records.JOURNAL_FILE}.bak-*")
    assert backup.read_bytes() == damaged
    assert (study / records.JOURNAL_FILE).read_bytes() == intact

    rc, after, err = status(study, capsys)
    assert (rc, err) == (0, "")
    assert after == before


def test_repair_of_a_healthy_journal_changes_nothing(study, capsys):
    journal_file = study / records.JOURNAL_FILE
    intact, mtime = journal_file.read_bytes(), journal_file.stat().st_mtime_ns
    assert main(["repair", str(study)]) == 0
    out = capsys.readouterr().out
    assert "is healthy" in out and "nothing changed" in out
    assert "study 'night' loads: 4 trials" in out
    assert journal_file.read_bytes() == intact and journal_file.stat().st_mtime_ns == mtime
    assert not list(study.glob("*.bak-*"))


def test_a_torn_last_line_alone_is_still_cut_on_opening(study, capsys):
    rc, before, _ = status(study, capsys)
    intact = (study / records.JOURNAL_FILE).read_bytes()
    with open(study / records.JOURNAL_FILE, "ab") as f:
        f.write(b'{"op_code":6,"worker_id":"dead","trial_id":')
    assert journal.bad_lines(study / records.JOURNAL_FILE) == []
    rc, after, err = status(study, capsys)
    assert rc == 0 and after == before
    assert "half-written" in err and "basin: error" not in err
    assert (study / records.JOURNAL_FILE).read_bytes() == intact


def test_repair_also_drops_a_torn_last_line_behind_garbage(study, capsys):
    intact = (study / records.JOURNAL_FILE).read_bytes()
    damaged = damage(study) + b'{"op_code":6,"wor'
    (study / records.JOURNAL_FILE).write_bytes(damaged)
    assert main(["repair", str(study)]) == 0
    assert "dropped 4 bad lines" in capsys.readouterr().out
    assert (study / records.JOURNAL_FILE).read_bytes() == intact
    (backup,) = study.glob("*.bak-*")
    assert backup.read_bytes() == damaged


def test_repair_without_a_journal_says_there_is_nothing_to_repair(study, tmp_path, capsys):
    (study / records.JOURNAL_FILE).unlink()
    assert main(["repair", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("basin: error: ") and "nothing to repair" in err and "gone" in err

    db = tmp_path / "db"
    db.mkdir()
    records.write_config_snapshot(db, {"study": {"storage": "postgresql://u:secret@h/basin"}})
    assert main(["repair", str(db)]) == 2
    err = capsys.readouterr().err
    assert "in a database" in err and "nothing to repair" in err and "secret" not in err

    assert main(["repair", str(tmp_path / "nowhere")]) == 2
    assert "is not a study folder" in capsys.readouterr().err


def test_bad_lines_counts_complete_lines_that_are_not_objects(tmp_path):
    path = tmp_path / "journal.log"
    long = b"x" * 100
    path.write_bytes(
        b'{"op_code": 0}\n'
        b"[1, 2]\n"
        b"\n"
        b'{"op_code": 1}\r\n'
        b'{"op_code": 1\n'
        b"\xff\xfe\n" + long + b"\n"
        b'{"torn": '
    )
    bad = journal.bad_lines(path)
    assert [b.number for b in bad] == [2, 3, 5, 6, 7]
    assert bad[0].preview == "[1, 2]" and bad[1].preview == ""
    assert bad[4].preview == "x" * journal.PREVIEW_CHARS + "..."


def test_the_scan_is_fast_on_a_large_journal(tmp_path):
    import time

    path = tmp_path / "journal.log"
    op = b'{"op_code":5,"worker_id":"w","trial_id":1,"param_name":"lambda","param_value_internal"'
    op += b':0.5,"distribution":"{\\"name\\": \\"FloatDistribution\\"}"}\n'
    path.write_bytes(op * (20_000_000 // len(op)) + b"garbage\n")
    start = time.perf_counter()
    bad = journal.bad_lines(path)
    assert time.perf_counter() - start < 10
    assert [b.preview for b in bad] == ["garbage"]


def test_the_message_counts_the_bad_lines():
    path, folder = Path("r/night/journal.log"), Path("r/night")
    one = journal.describe(path, [journal.BadLine(9, "oops")], folder)
    assert one.startswith("r/night/journal.log: line 9 is not a journal operation ('oops'), so ")
    assert "such lines" not in one and "delete that line by hand" in one
    many = journal.describe(path, [journal.BadLine(n, "x") for n in range(2, 10)], folder)
    assert "one of 8 such lines (2, 3, 4, 5, 6 and 3 more)" in many
    assert "`basin repair r/night`" in many


def test_garbage_as_the_last_line_is_caught_before_a_run_appends_after_it(study, capsys):
    """Optuna's reader skips a bad last line, so the study opens, and the next append makes it a
    bad line in the middle: the run that appended would fail on its next read."""
    with open(study / records.JOURNAL_FILE, "ab") as f:
        f.write(b"garbage\n")
    rc, _, err = status(study, capsys)
    assert rc == 2
    assert "line" in err and "('garbage')" in err and "basin repair" in err
