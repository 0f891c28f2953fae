"""The front end of a test PanDA server: what Apache, mod_wsgi and mod_gridsite are
in production, for the server's WSGI app (``pandaserver.server.panda.application``).

Usage: ``python front_end.py PORT IDENTITIES_FILE`` (the server's venv; its config
through ``$PANDA_HOME``). Listens on 127.0.0.1:PORT and serves

* ``/api/v1/<module>/<method>`` and ``/server/panda/<method>``: the app, with
  ``SCRIPT_NAME`` set to the whole path, as ``WSGIScriptAliasMatch`` does (the app
  routes on it);
* ``/cache/<name>``: the files of the server's ``cache_dir`` (Apache's ``Alias``).

Who calls: a request with ``Authorization: Bearer`` goes to the app as it came,
and the app checks the token itself (``token_authType = oidc``: signature against
the issuer's JWKS, expiry, audience, VO group), as behind Apache at an OIDC site.
mod_gridsite exports a client certificate's DN as ``SSL_CLIENT_S_DN``; here a
request without a token (JEDI's and the server's own calls, the pilot stand-in)
gets ``anonymous_dn`` of IDENTITIES_FILE (JSON ``{"anonymous_dn": DN}``, read
once), which the config lists among ``production_dns``, as a pilot's production
proxy would be.
"""

import json
import mimetypes
import os
import sys

import pandaserver.server.panda as panda_entry
from pandaserver.config import panda_config
from werkzeug.serving import run_simple


def _reply(start_response, status, body, content_type="text/plain"):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def make_app(identities):
    """Return the front end's WSGI app for these identities."""
    anonymous = identities.get("anonymous_dn")

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/cache/"):
            name = os.path.basename(path)
            file = os.path.join(panda_config.cache_dir, name)
            if not name or not os.path.isfile(file):
                return _reply(start_response, "404 Not Found", b"not found")
            with open(file, "rb") as handle:
                data = handle.read()
            kind = mimetypes.guess_type(file)[0] or "application/octet-stream"
            return _reply(start_response, "200 OK", data, kind)
        if not path.startswith(("/api/", "/server/panda/")):
            return _reply(start_response, "404 Not Found", b"not found")
        # Nothing the client sent may pose as what the TLS layer would export.
        for key in [k for k in environ if k.startswith(("SSL_", "GRST_"))]:
            del environ[key]
        if not environ.get("HTTP_AUTHORIZATION") and anonymous:
            environ["SSL_CLIENT_S_DN"] = anonymous
        environ["SCRIPT_NAME"] = path
        environ["PATH_INFO"] = ""
        return panda_entry.application(environ, start_response)

    return app


def main():
    """Serve until killed."""
    port, identities_file = int(sys.argv[1]), sys.argv[2]
    with open(identities_file) as handle:
        identities = json.load(handle)
    print(f"front end on 127.0.0.1:{port}", flush=True)
    run_simple("127.0.0.1", port, make_app(identities), threaded=True)


if __name__ == "__main__":
    main()
