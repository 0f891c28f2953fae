"""The bootstrap each PanDA job runs on its node: fetch the wrapper from the cache, start it.

The job secrets reach it as a PanDA user secret: in the pilot's
``panda_secrets.json`` (or an environment variable of the secret's name, as
some pilots give them). It takes ours out of both (the file is rewritten
without it, mode 0600) and hands it to the wrapper on a pipe
(``IDDS_FAT_JOB_SECRETS_FD``), so neither the wrapper's environment block nor
the job's directory holds it when the user's code runs.
"""

from __future__ import annotations

import base64

# The pilot's file for user secrets in the job's directory (pilot3 ``hide_secrets``).
PANDA_SECRETS_FILE = "panda_secrets.json"

# Runs on the node as ``python3 - SECRET_NAME WRAPPER_URL ENTRY`` (the code comes in
# on stdin). Standard library only; exit status 2 is the wrapper's "could not start".
_BOOTSTRAP = r"""
import base64, hashlib, json, os, sys, time, urllib.error, urllib.request
name, wrapper_url, entry = sys.argv[1:4]
def fail(message):
    sys.stderr.write("idds-fat bootstrap: %s\n" % message)
    sys.exit(2)
# ${IN/L} is one entry, or a list of them when a job packs several (nFilesPerJob).
entries = [e.strip("[]'\" ") for e in entry.split(",") if e.strip("[]'\" ")]
specs = [json.loads(base64.urlsafe_b64decode(e + "=" * (-len(e) % 4)))["spec"] for e in entries]
value = os.environ.get("IDDS_FAT_JOB_SECRETS")  # a site's own hook, when name is "-"
if name != "-":
    value = os.environ.pop(name, None)
    if os.path.exists("panda_secrets.json"):
        with open("panda_secrets.json") as handle:
            others = json.load(handle)
        if value is None:
            value = others.get(name)
        if others.pop(name, None) is not None:  # the user's code must not find it there
            fd = os.open(".panda_secrets.json.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(others, handle)
            os.replace(".panda_secrets.json.tmp", "panda_secrets.json")
    if value is None:
        fail("PanDA user secret %s not found (was the task submitted with useSecrets?)" % name)
    if len(value.encode()) > 4096:
        fail("PanDA user secret %s is over 4096 bytes" % name)
    read_end, write_end = os.pipe()
    os.write(write_end, value.encode())
    os.close(write_end)
    os.set_inheritable(read_end, True)
    os.environ["IDDS_FAT_JOB_SECRETS_FD"] = str(read_end)
token = json.loads(value or "{}").get("token")
request = urllib.request.Request(wrapper_url)
if token:
    request.add_header("Authorization", "Bearer " + token)
for attempt in range(6):
    try:
        data = urllib.request.urlopen(request, timeout=120).read()
        break
    except Exception as exc:
        code = getattr(exc, "code", 500) if isinstance(exc, urllib.error.HTTPError) else 500
        if attempt == 5 or (code < 500 and code not in (408, 429)):
            fail("cannot fetch the wrapper %s: %s" % (wrapper_url, exc))
        time.sleep(2 ** attempt)
key = wrapper_url.rstrip("/").rsplit("/", 1)[-1]
if len(key) == 64 and hashlib.sha256(data).hexdigest() != key:
    fail("the wrapper fetched from %s does not match its sha256" % wrapper_url)
with open("idds_fat_wrapper.py", "wb") as handle:
    handle.write(data)
if len(specs) == 1:
    os.execv(sys.executable, [sys.executable, "idds_fat_wrapper.py", "--spec", specs[0]])
with open("idds_fat_jobs.tsv", "w") as handle:
    handle.writelines("0\tjob-%d\t%s\n" % (i, spec) for i, spec in enumerate(specs))
os.execv(
    sys.executable,
    [sys.executable, "idds_fat_wrapper.py", "--jobs-file", "idds_fat_jobs.tsv", "--pack", "0"],
)
"""
BOOTSTRAP_B64 = base64.b64encode(_BOOTSTRAP.encode()).decode()
