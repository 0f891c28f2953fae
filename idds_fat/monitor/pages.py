"""The monitoring pages' HTML: shells that the script fills with data from ``/api``.

They carry no workflow data, so they need no token; the one value from the
request (a workflow id in the path) is HTML-escaped.
"""

from __future__ import annotations

import html

_HEAD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="/static/monitor.css">
<script src="/static/monitor.js" defer></script>
</head>
"""

_TOKEN_FORM = """<form id="token-form" class="token" hidden>
  <label>Service token
    <input type="password" id="token-input" autocomplete="off" required></label>
  <button type="submit">Use token</button>
  <p class="hint">This service wants its bearer token. <code>idds-fat monitor WORKFLOW</code>
  prints it for a workflow's own service; it is kept in this tab only.</p>
</form>
"""

_HEADER = """<header>
  <a class="brand" href="/">idds-fat</a>
  <span id="live" class="live" role="status"></span>
  <button type="button" id="forget-token" class="link" hidden>Forget token</button>
</header>
"""

_INDEX_BODY = """<body data-page="index">
{header}<main>
{token_form}<h1>Workflows</h1>
<table id="workflows" class="grid">
  <thead><tr><th>Name</th><th>Id</th><th>User</th><th>Status</th><th>Created</th>
  <th>Tasks</th><th>Jobs by state</th><th>Progress</th></tr></thead>
  <tbody></tbody>
</table>
<p id="empty" class="hint" hidden>No workflows yet.</p>
</main>
</body>
</html>
"""

_WORKFLOW_BODY = """<body data-page="workflow" data-workflow="{workflow}">
{header}<main>
{token_form}<h1><span id="wf-name"></span> <small id="wf-id">{workflow}</small></h1>
<p id="wf-summary" class="summary"></p>
<p><button type="button" id="cancel-workflow" class="danger">Cancel workflow</button>
<span id="message" class="message" role="alert"></span></p>

<section>
<h2>Tasks</h2>
<table id="tasks" class="grid">
  <thead><tr><th>Iteration</th><th>Task</th><th>Name</th><th>Function</th><th>Jobs</th>
  <th>Waiting</th><th>Queued</th><th>Running</th><th>Done</th><th>Failed</th><th>Lost</th><th>Cancelled</th>
  <th>Best</th><th></th></tr></thead>
  <tbody></tbody>
</table>
</section>

<section class="plots">
<div>
<h2>Timeline of jobs</h2>
<p class="legend"><span class="waiting">waiting</span> <span class="queued">queued</span>
<span class="running">running</span>
<span class="done">done</span> <span class="failed">failed</span>
<span class="lost">lost</span> <span class="cancelled">cancelled</span>
<span id="timeline-note"></span></p>
<svg id="timeline" role="img" aria-label="timeline of jobs"></svg>
</div>
<div>
<h2>Best so far</h2>
<p><label>Best is the <select id="direction">
<option value="min">least</option><option value="max">greatest</option></select> value</label></p>
<svg id="best" role="img" aria-label="best value so far per iteration"></svg>
<p id="best-note" class="hint">No job returned a number yet.</p>
</div>
</section>

<section>
<h2>Trials</h2>
<p class="hint">Each job's arguments (for HPO, its hyper-parameters) and the number it
returned; click a row for its details.</p>
<table id="trials" class="grid">
  <thead><tr><th>Job</th><th>Arguments</th><th>Status</th>
  <th><button type="button" id="sort-value" class="link" data-order="none">Value</button></th>
  </tr></thead>
  <tbody></tbody>
</table>
</section>

<section id="job" hidden>
<h2>Job <span id="job-title"></span></h2>
<p id="job-summary" class="summary"></p>
<p class="summary">Arguments: <code id="job-arguments"></code></p>
<h3>Remote traceback</h3>
<pre id="job-error"></pre>
<h3>Last lines of stderr</h3>
<pre id="job-stderr"></pre>
</section>
</main>
</body>
</html>
"""


def index_page() -> str:
    """Return the HTML of ``/``: the workflows under the service's work dir."""
    body = _INDEX_BODY.format(header=_HEADER, token_form=_TOKEN_FORM)
    return _HEAD.format(title="idds-fat workflows") + body


def workflow_page(workflow_id: str) -> str:
    """Return the HTML of ``/workflows/ID`` for ``workflow_id`` (escaped: it comes from the URL)."""
    shown = html.escape(workflow_id, quote=True)
    body = _WORKFLOW_BODY.format(header=_HEADER, token_form=_TOKEN_FORM, workflow=shown)
    return _HEAD.format(title=f"{shown} - idds-fat") + body
