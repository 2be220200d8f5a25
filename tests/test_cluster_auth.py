"""Where `cluster/local.py up` takes its auth token from: a fresh HOME has none, and `ray start --head` with token
auth makes none of its own (it exits at once), so `up` must find or make one and hand it to every node and CLI call.
No cluster is started here (tests/test_cluster.py starts one)."""

import stat

import pytest

from cluster import local


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    return home


def test_an_empty_home_gets_a_token_made_once_in_the_state_dir(empty_home, tmp_path):
    auth = local.auth_token(tmp_path / "state")
    token = tmp_path / "state" / "auth_token"
    assert auth == {"source": "made by up", "path": str(token.resolve())}
    assert len(token.read_text()) == 64 and stat.S_IMODE(token.stat().st_mode) == 0o600
    again = local.auth_token(tmp_path / "state")
    assert again["path"] == auth["path"] and token.read_text() == token.read_text()
    assert not (empty_home / ".ray").exists()  # nothing written into the user's HOME
    env = local.node_env({"auth": auth})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == auth["path"]


def test_an_existing_home_token_is_used(empty_home, tmp_path):
    (empty_home / ".ray").mkdir()
    (empty_home / ".ray" / "auth_token").write_text("x" * 32)
    assert local.auth_token(tmp_path / "state") == {
        "source": "~/.ray/auth_token",
        "path": str(empty_home / ".ray" / "auth_token"),
    }
    assert not (tmp_path / "state" / "auth_token").exists()


def test_the_environment_wins(empty_home, tmp_path, monkeypatch):
    given = tmp_path / "tok"
    given.write_text("y" * 32)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(given))
    assert local.auth_token(tmp_path / "s")["path"] == str(given.resolve())
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="no such file"):
        local.auth_token(tmp_path / "s")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "z" * 32)
    auth = local.auth_token(tmp_path / "s")
    assert auth == {"source": "RAY_AUTH_TOKEN"}
    assert local.cli_env({"auth": auth})["RAY_AUTH_TOKEN"] == "z" * 32
