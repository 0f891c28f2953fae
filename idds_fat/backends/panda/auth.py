"""PanDA credentials: an OIDC ID token or an X.509 proxy, found as panda-client finds them."""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from idds_fat.backends.panda.errors import PandaAuthError
from idds_fat.errors import ConfigError


@dataclass(frozen=True)
class PandaAuth:
    """How requests prove who the caller is, as panda-client does (PANDA_API.md §1).

    ``mode="oidc"``: an ID token sent as ``Authorization: Bearer`` with the VO in
    ``Origin``; the token is ``token`` or the (stripped) contents of ``token_file``,
    re-read on every request so an outside refresher can renew it.
    ``mode="x509"``: the proxy file ``proxy`` (certificate and key) as client
    certificate. The token never appears in ``repr``, logs or error messages.
    """

    mode: str
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    vo: str | None = None
    proxy: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("oidc", "x509"):
            raise ConfigError(f"PanDA auth mode must be 'oidc' or 'x509', not {self.mode!r}")
        if self.mode == "oidc" and not (self.token or self.token_file):
            raise PandaAuthError("OIDC auth needs an ID token or a token file")
        if self.mode == "oidc" and not self.vo:
            raise PandaAuthError("OIDC auth needs the VO (PANDA_AUTH_VO or OIDC_AUTH_VO)")
        if self.mode == "x509" and self.proxy is None:
            raise PandaAuthError("X.509 auth needs a proxy file")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PandaAuth:
        """Find credentials where panda-client looks for them.

        ``PANDA_AUTH=oidc`` selects a token: ``$PANDA_AUTH_ID_TOKEN``, the file
        named by ``$OIDC_AUTH_TOKEN_FILE``, ``$OIDC_AUTH_ID_TOKEN``, then the
        ``id_token`` cached in ``$PANDA_CONFIG_ROOT/.token`` (no refresh, no
        device flow: run a panda-client command to renew it), with the VO from
        ``$PANDA_AUTH_VO`` or ``$OIDC_AUTH_VO``. Anything else selects the X.509
        proxy ``$X509_USER_PROXY`` or ``/tmp/x509up_u<uid>``.

        Raises:
            PandaAuthError: no token, no VO, or no readable proxy.
        """
        env = os.environ if environ is None else environ
        if env.get("PANDA_AUTH") == "oidc":
            vo = env.get("PANDA_AUTH_VO") or env.get("OIDC_AUTH_VO")
            if env.get("PANDA_AUTH_ID_TOKEN"):
                return cls("oidc", token=env["PANDA_AUTH_ID_TOKEN"].strip(), vo=vo)
            if env.get("OIDC_AUTH_TOKEN_FILE"):
                return cls("oidc", token_file=Path(env["OIDC_AUTH_TOKEN_FILE"]), vo=vo)
            if env.get("OIDC_AUTH_ID_TOKEN"):
                return cls("oidc", token=env["OIDC_AUTH_ID_TOKEN"].strip(), vo=vo)
            cached = Path(env.get("PANDA_CONFIG_ROOT", ".")).expanduser() / ".token"
            try:
                token = json.loads(cached.read_text())["id_token"]
            except (OSError, ValueError, KeyError, TypeError):
                raise PandaAuthError(
                    "PANDA_AUTH=oidc but no ID token found: set PANDA_AUTH_ID_TOKEN, "
                    "OIDC_AUTH_TOKEN_FILE or OIDC_AUTH_ID_TOKEN, or log in with panda-client "
                    f"so that {cached} holds one"
                ) from None
            return cls("oidc", token=str(token).strip(), vo=vo)
        proxy = env.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"
        if not os.access(proxy, os.R_OK):
            raise PandaAuthError(
                f"no readable X.509 proxy at {proxy}: run voms-proxy-init, set "
                "X509_USER_PROXY, or use PANDA_AUTH=oidc with a token"
            )
        return cls("x509", proxy=Path(proxy))

    def bearer_token(self) -> str | None:
        """Return the ID token (re-reading ``token_file``), or None in X.509 mode.

        Raises:
            PandaAuthError: the token file cannot be read.
        """
        if self.mode != "oidc":
            return None
        if self.token_file is not None:
            try:
                # panda-client reads the file as-is; a trailing newline breaks the header.
                return self.token_file.read_text().strip()
            except OSError as exc:
                raise PandaAuthError(
                    f"cannot read the token file {self.token_file}: {exc.strerror}"
                ) from None
        return self.token

    def describe(self) -> str:
        """Say which credentials these are, without the token: its source, VO and,
        for a JWT, when it expires (read from its claims, not verified)."""
        if self.mode == "x509":
            return f"the X.509 proxy {self.proxy}"
        source = f"the token file {self.token_file}" if self.token_file else "an ID token"
        text = f"{source} for VO {self.vo}"
        try:
            token = self.bearer_token() or ""
        except PandaAuthError:
            return text
        expires = _expiry(token)
        if expires is not None:
            left = expires - time.time()
            when = f"expired {-left:.0f} s ago" if left <= 0 else f"expires in {left:.0f} s"
            text += f", {when}"
        return text

    def headers(self) -> dict[str, str]:
        """Return the auth headers of one request (none in X.509 mode)."""
        token = self.bearer_token()
        if token is None:
            return {}
        return {"Authorization": "Bearer " + token, "Origin": str(self.vo)}


def _expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, or None when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) else None
