"""The bootstrap each PanDA job runs on its node: fetch the wrapper from the cache, start it."""

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
if name != "-":
    value = os.environ.pop(name, None)
    if value is None and os.path.exists("panda_secrets.json"):
        with open("panda_secrets.json") as handle:
            value = json.load(handle).get(name)
    if value is None:
        fail("PanDA user secret %s not found (was the task submitted with useSecrets?)" % name)
    os.environ["IDDS_FAT_JOB_SECRETS"] = value
token = json.loads(os.environ.get("IDDS_FAT_JOB_SECRETS") or "{}").get("token")
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
