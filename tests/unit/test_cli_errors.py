"""Bad input to the CLI: one clear line on stderr and exit status 2, never a traceback."""

import logging
import subprocess
import sys

import pytest

from infra.cli import main
from tests.conftest import ROOT

YOOCHOOSE_ROWS = "SessionId\tItemId\tTime\n1\t10\t1700000100\n1\t11\t1700000160\n"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def clicks(tmp_path):
    path = tmp_path / "clicks.txt"
    path.write_text(YOOCHOOSE_ROWS)
    return path


def bad_inputs(tmp_path, clicks):
    """(argv, what the one line must say) for each kind of bad input."""
    wrong_shape = tmp_path / "ratings.csv"
    wrong_shape.write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,11,oops,1\n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    out = str(tmp_path / "r.json")
    return [
        (["--data", str(tmp_path / "missing.txt")], "missing.txt: no such file or folder"),
        (["--data", str(folder), "--format", "diginetica"],
         "is a folder; --format diginetica needs a file (train-item-views.csv"),
        (["--data", str(folder), "--format", "movielens"], "ratings.csv or ratings.dat or u.data"),
        (["--data", str(folder)], "is a folder without yoochoose-clicks-100k_train_full.txt"),
        (["--data", str(clicks), "--format", "nope"], "unknown format 'nope'"),
        (["--data", str(clicks), "--models", "session,bogus"], "unknown model 'bogus'"),
        (["--data", str(clicks), "--format", "csv:usr=a"], "bad column mapping 'usr=a'"),
        (["--data", str(clicks), "--format", "csv:user=a,item=b,ts=c"],
         "header lacks column(s) a, b, c"),
        (["--data", str(wrong_shape), "--format", "movielens"], "ratings.csv:3: unexpected row"),
        (["--data", str(binary), "--format", "yoochoose"], "blob.txt:1: not a YooChoose row"),
    ], out


def test_each_bad_input_is_one_line_and_exit_2(tmp_path, clicks, capsys):
    cases, out = bad_inputs(tmp_path, clicks)
    for argv, expected in cases:
        code, err = run_cli(capsys, "replay", *argv, "--quiet", "--out", out)
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("streamrec replay: error: "), (argv, err)
        assert expected in err, (argv, err)


def test_a_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "--data",
                          str(tmp_path / "nothing-here"), "--quiet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"streamrec replay: error: {tmp_path / 'nothing-here'}: no such file or folder"]


def test_models_all_is_every_registered_model():
    from online_models.registry import BASELINES, MODELS, UnknownModelError, resolve_names

    assert resolve_names("all") == list(MODELS)
    assert resolve_names("mf, session,mf") == ["mf", "session", *BASELINES]
    with pytest.raises(UnknownModelError, match="known: session"):
        resolve_names("all,nope")


@pytest.mark.parametrize("name,parts", [("two_tower", "two_tower"), ("user_blend", "two_tower"),
                                        ("session_seq", "sasrec")])
def test_the_worker_refuses_a_model_trained_in_versions(monkeypatch, capsys, name, parts):
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", "unused:9092")  # never reached
    monkeypatch.setenv("STREAMREC_REDIS_URL", "redis://unused:6379")
    monkeypatch.setenv("STREAMREC_LIVE_MODELS", f"session,{name}")
    code, err = run_cli(capsys, "worker")
    assert code == 2 and f"{name!r} holds {parts}, trained in versions" in err
    assert len(err.strip().splitlines()) == 1


def test_live_models_learn_per_event_and_mixtures_of_them_pass():
    from online_models.registry import build, build_live, nearline_parts

    for name in ("session", "mf", "cooc", "als", "content", "user_blend_ctx"):
        assert build_live(name) is not None and not nearline_parts(build(name))


@pytest.mark.parametrize("argv,expected", [
    (["replay", "--data", "x", "--chunk", "0"],
     "argument --chunk: must be a whole number ≥ 1, not '0'"),
    (["replay", "--data", "x", "--bootstrap", "-3"],
     "argument --bootstrap: must be a whole number ≥ 1"),
    (["replay", "--data", "x", "--k", "ten"],
     "argument --k: must be a whole number ≥ 1, not 'ten'"),
    (["replay", "--data", "x", "--warmup", "1"], "argument --warmup: must be a number in [0, 1)"),
    (["replay", "--data", "x", "--test-days", "-1"], "argument --test-days: must be a number > 0"),
    (["demo", "--rate", "-5"], "argument --rate: must be a number > 0, not '-5'"),
    (["demo", "--rate", "inf"], "argument --rate: must be a number > 0, not 'inf'"),
    (["demo", "--malformed-rate", "nan"], "argument --malformed-rate: must be a number in [0, 1]"),
    (["produce", "--users", "0"], "argument --users: must be a whole number ≥ 1"),
    (["api", "--port", "70000"], "argument --port: must be a whole number in [1, 65535]"),
    (["services", "--redis-cluster", "2"], "Redis Cluster needs 3 primaries"),
    (["offsets", "--partition", "-1"], "argument --partition: must be a whole number ≥ 0"),
    (["replay", "--data", "x", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_numbers_out_of_range_are_one_line_and_exit_2(capsys, argv, expected):
    code, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and ": error: " in err and expected in err, err


def test_an_option_from_the_environment_is_checked_like_the_command_line(monkeypatch, capsys):
    monkeypatch.setenv("STREAMREC_REPLAY_CHUNK", "many")
    code, err = run_cli(capsys, "replay", "--data", "x")
    assert code == 2 and "argument --chunk: must be a whole number ≥ 1, not 'many'" in err
    monkeypatch.setenv("STREAMREC_REPLAY_CHUNK", "250")
    from infra.cli import build_parser

    assert build_parser().parse_args(["replay", "--data", "x"]).chunk == 250


def test_settings_a_command_lacks_are_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    for name in ("STREAMREC_KAFKA_BOOTSTRAP", "STREAMREC_REDIS_URL", "STREAMREC_TRAINER_DIR"):
        monkeypatch.delenv(name, raising=False)
    code, err = run_cli(capsys, "trainer")
    assert code == 2 and err.startswith("streamrec trainer: error: STREAMREC_KAFKA_BOOTSTRAP")
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", "unused:9092")  # never reached
    monkeypatch.setenv("STREAMREC_REDIS_URL", "redis://unused:6379")
    code, err = run_cli(capsys, "trainer")
    assert code == 2 and "error: set STREAMREC_TRAINER_DIR" in err
    monkeypatch.setenv("STREAMREC_TRAINER_DIR", str(tmp_path))
    code, err = run_cli(capsys, "trainer", "--model", "bogus")
    assert code == 2 and "error: --model must be one of two_tower" in err and "'bogus'" in err
    assert err.count("\n") == 1


def test_kafka_pythons_slow_step_warnings_never_reach_stderr(capsys):
    """kafka-python 3 warns when one step of its network loop takes over 0.1 s, which a busy
    machine causes alone: before this, such a line came ahead of a role's one-line error."""
    run_cli(capsys, "api", "--port", "70000")
    assert not logging.getLogger("kafka.net.selector").isEnabledFor(logging.WARNING)
    assert logging.getLogger("kafka").isEnabledFor(logging.WARNING)  # the rest still speaks
