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

With ``"tls": {"port", "cert", "key", "ca_dir"}`` in IDENTITIES_FILE it also listens
on 127.0.0.1:``port`` with TLS, as Apache's mod_ssl does at a site: the server
certificate ``cert``/``key``, and a client certificate required and verified against
the CA directory ``ca_dir`` (hashed names, as ``/etc/grid-security/certificates``),
RFC 3820 proxy certificates allowed (``GridSiteGSIProxyLimit``'s job in production).
A client whose certificate does not verify never gets past the handshake. For one
that does, the app sees what ``SSLOptions +StdEnvVars +LegacyDNStringFormat`` of
upstream's ``panda_server-httpd.conf`` exports: ``HTTPS``, ``SSL_CLIENT_VERIFY``,
``SSL_CLIENT_S_DN`` and ``SSL_CLIENT_I_DN`` in OpenSSL's ``/DC=../CN=..`` form,
``SSL_CLIENT_M_SERIAL``, ``SSL_CLIENT_V_START``, ``SSL_CLIENT_V_END``; the server
derives the user from ``SSL_CLIENT_S_DN`` (``CoreUtils.clean_user_id``). VOMS
attributes (mod_gridsite's ``GRST_CRED_*``) are not exported: the test proxies carry
none.
"""

import json
import mimetypes
import os
import socket
import ssl
import sys
import threading

import pandaserver.server.panda as panda_entry
from pandaserver.config import panda_config
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler, make_server

# Where the TLS listener's request handler leaves what it verified for the app: a
# server key (dotted), which no request header can become.
_VERIFIED = "idds_fat.verified_client"
# OpenSSL's short names for the attributes a grid DN uses (X509_NAME_oneline).
_SHORT_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "domainComponent": "DC",
    "userId": "UID",
}


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
        verified = environ.pop(_VERIFIED, None)
        if verified is not None:
            environ.update(verified)
        elif not environ.get("HTTP_AUTHORIZATION") and anonymous:
            environ["SSL_CLIENT_S_DN"] = anonymous
        environ["SCRIPT_NAME"] = path
        environ["PATH_INFO"] = ""
        return panda_entry.application(environ, start_response)

    return app


def _oneline(name):
    """A subject or issuer of ``getpeercert()`` as OpenSSL's ``/DC=a/CN=b`` string."""
    return "".join(f"/{_SHORT_NAMES.get(key, key)}={value}" for rdn in name for key, value in rdn)


class _VerifiedClientHandler(WSGIRequestHandler):
    """Adds what mod_ssl exports for a verified client certificate to the environ."""

    def make_environ(self):
        environ = super().make_environ()
        # A dict only for a certificate the handshake verified (CERT_REQUIRED).
        cert = self.connection.getpeercert()
        if cert:
            environ[_VERIFIED] = {
                "HTTPS": "on",
                "SSL_CLIENT_VERIFY": "SUCCESS",
                "SSL_CLIENT_S_DN": _oneline(cert["subject"]),
                "SSL_CLIENT_I_DN": _oneline(cert["issuer"]),
                "SSL_CLIENT_M_SERIAL": cert.get("serialNumber", ""),
                "SSL_CLIENT_V_START": cert.get("notBefore", ""),
                "SSL_CLIENT_V_END": cert.get("notAfter", ""),
            }
        return environ


class _TLSServer(ThreadedWSGIServer):
    """A threaded server that does each TLS handshake in the request's thread, not in
    ``accept``, and closes a refused one as Apache's lingering close does: the alert
    is sent, then what the client already sent is read and dropped, so the client
    reads the alert (``unknown ca``, ``certificate required``) instead of a reset."""

    def __init__(self, host, port, app, context):
        super().__init__(host, port, app, _VerifiedClientHandler)
        self.ssl_context = context  # after __init__: the listening socket stays plain

    def finish_request(self, request, client_address):
        tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.settimeout(10)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self.log("info", "TLS handshake with %s refused: %s", client_address[0], exc)
                _linger(tls)
                return
            tls.settimeout(None)
            super().finish_request(tls, client_address)
        finally:
            tls.close()


def _linger(tls):
    try:
        tls.shutdown(socket.SHUT_WR)
        tls.settimeout(1)
        while tls.recv(65536):
            pass
    except OSError:
        pass


def _tls_context(tls):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # SSLProtocol all -SSLv3 -TLSv1 -TLSv1.1
    context.load_cert_chain(tls["cert"], tls["key"])
    context.load_verify_locations(capath=tls["ca_dir"])
    context.verify_mode = ssl.CERT_REQUIRED
    # A grid proxy is signed by its user's certificate, not by a CA.
    context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    return context


def main():
    """Serve until killed."""
    port, identities_file = int(sys.argv[1]), sys.argv[2]
    with open(identities_file) as handle:
        identities = json.load(handle)
    app = make_app(identities)
    tls = identities.get("tls")
    if tls:
        secure = _TLSServer("127.0.0.1", int(tls["port"]), app, _tls_context(tls))
        threading.Thread(target=secure.serve_forever, name="tls", daemon=True).start()
        print(f"front end with TLS on 127.0.0.1:{tls['port']}", flush=True)
    print(f"front end on 127.0.0.1:{port}", flush=True)
    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
