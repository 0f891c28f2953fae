from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from idds_fat.cli import main
from idds_fat.errors import ServiceError
from idds_fat.service import EmbeddedService, serve
from idds_fat.service.server import is_loopback


def test_embedded_service_answers_once_started_and_not_after_stop(tmp_path: Path) -> None:
    service = EmbeddedService(tmp_path, token=None).start()
    url = service.url
    assert url.startswith("http://127.0.0.1:")
    assert requests.get(url + "/healthz", timeout=10).json() == {"ok": True}
    service.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/healthz", timeout=10)
    with pytest.raises(ServiceError):
        service.url  # noqa: B018


def test_embedded_service_keeps_data_in_data_dir(tmp_path: Path) -> None:
    with EmbeddedService(tmp_path, token=None):
        pass
    assert (tmp_path / "results.sqlite3").is_file()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.org", "::"])
def test_serve_refuses_non_loopback_host_without_token(tmp_path: Path, host: str) -> None:
    with pytest.raises(ServiceError, match="token"):
        serve(host, 8470, tmp_path, token=None, result_ttl_seconds=60)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_hosts_are_recognised(host: str) -> None:
    assert is_loopback(host)


def test_cli_serve_help_mentions_token_environment_variable() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--host", "--port", "--data-dir", "--token", "--result-ttl-days"):
        assert option in result.output
    assert "IDDS_FAT_TOKEN" in result.output


def test_cli_serve_refuses_public_host_without_token(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("IDDS_FAT_TOKEN", raising=False)
    monkeypatch.setenv("IDDS_FAT_CONFIG", str(tmp_path / "absent.toml"))
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "refusing" in result.output
