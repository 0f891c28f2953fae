// The idds-fat monitoring page: polls /api with the service token and redraws in place.
// Every value from the API reaches the page through textContent or an SVG attribute,
// never through innerHTML, so names, kwargs and tracebacks cannot inject markup.
"use strict";

(function () {
  const TOKEN_KEY = "idds-fat-token";
  const POLL_MS = 1000;
  const STATES = ["waiting", "queued", "running", "done", "failed", "lost", "cancelled"];
  const FINISHED = ["done", "failed", "lost", "cancelled"];
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  // --- the token: asked for once per tab, kept in sessionStorage, sent as a header ---

  class Unauthorized extends Error {}

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  // A link with the token in its fragment (#token=..., which browsers never send to a
  // server) signs the tab in: keep the token, then drop it from the address bar and history.
  function takeTokenFromFragment() {
    const given = new URLSearchParams(location.hash.slice(1)).get("token");
    if (!given) return;
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, "", location.pathname + location.search);
  }

  function askForToken(wrong) {
    const form = $("token-form");
    form.hidden = false;
    $("token-input").setCustomValidity(wrong ? "this token was refused" : "");
    $("live").textContent = wrong ? "token refused" : "token needed";
    $("token-input").focus();
  }

  function setUpToken(onToken) {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
      $("token-input").value = "";
      $("token-form").hidden = true;
      $("forget-token").hidden = false;
      onToken();
    });
    $("forget-token").hidden = !token();
    $("forget-token").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("forget-token").hidden = true;
      askForToken(false);
    });
  }

  async function api(path, options) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    const response = await fetch(path, { ...options, headers, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      throw new Unauthorized(String(response.status));
    }
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  // Poll `load` every POLL_MS until the token is refused; `draw` gets each answer.
  function poll(load, draw) {
    let timer = null;
    async function tick() {
      timer = null;
      try {
        draw(await load());
        $("live").textContent = "live · updated " + new Date().toLocaleTimeString();
        $("live").classList.remove("stale");
      } catch (error) {
        if (error instanceof Unauthorized) {
          askForToken(Boolean(token()));
          return; // resumes when a token is given
        }
        $("live").textContent = "not updating: " + error.message;
        $("live").classList.add("stale");
      }
      timer = setTimeout(tick, POLL_MS);
    }
    setUpToken(() => {
      if (timer === null) tick();
    });
    tick();
  }

  // --- small DOM helpers ---

  function cell(row, index, text) {
    while (row.cells.length <= index) row.insertCell();
    const target = row.cells[index];
    const shown = text === null || text === undefined ? "" : String(text);
    if (target.textContent !== shown) target.textContent = shown;
    return target;
  }

  function keyedRow(tbody, key) {
    let row = tbody.querySelector(`tr[data-key="${CSS.escape(key)}"]`);
    if (!row) {
      row = tbody.insertRow();
      row.dataset.key = key;
    }
    return row;
  }

  function dropOtherRows(tbody, keys) {
    for (const row of Array.from(tbody.rows)) {
      if (!keys.has(row.dataset.key)) row.remove();
    }
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "-";
  }

  function stateCounts(states) {
    const parts = Object.entries(states || {}).map(([s, n]) => `${n} ${s}`);
    return parts.length ? parts.join(", ") : "none";
  }

  function finishedCount(states) {
    return FINISHED.reduce((sum, s) => sum + ((states || {})[s] || 0), 0);
  }

  function number(value) {
    if (value === null || value === undefined) return "";
    return Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3)
      ? value.toExponential(3)
      : String(Math.round(value * 1e4) / 1e4);
  }

  function svgNode(parent, name, attributes) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
    parent.appendChild(node);
    return node;
  }

  // --- the list of workflows (/) ---

  function drawWorkflows(answer) {
    const tbody = $("workflows").tBodies[0];
    const keys = new Set();
    for (const wf of answer.workflows) {
      keys.add(wf.id);
      const row = keyedRow(tbody, wf.id);
      const nameCell = cell(row, 0, null);
      let link = nameCell.querySelector("a");
      if (!link) {
        link = document.createElement("a");
        link.href = "/workflows/" + encodeURIComponent(wf.id);
        nameCell.appendChild(link);
      }
      if (link.textContent !== wf.name) link.textContent = wf.name || wf.id;
      cell(row, 1, wf.id);
      cell(row, 2, wf.user || "-");
      cell(row, 3, wf.status).className = "status " + wf.status;
      cell(row, 4, when(wf.created));
      cell(row, 5, wf.tasks);
      cell(row, 6, stateCounts(wf.job_states));
      const progressCell = cell(row, 7, null);
      let bar = progressCell.querySelector("progress");
      if (!bar) bar = progressCell.appendChild(document.createElement("progress"));
      bar.max = Math.max(wf.jobs, 1);
      bar.value = finishedCount(wf.job_states);
      bar.title = `${finishedCount(wf.job_states)} of ${wf.jobs} jobs finished`;
    }
    dropOtherRows(tbody, keys);
    // Newest first, as the API answers.
    answer.workflows.forEach((wf, i) => {
      const row = keyedRow(tbody, wf.id);
      if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
    });
    $("empty").hidden = answer.workflows.length > 0;
  }

  // --- one workflow (/workflows/ID) ---

  function workflowPage(workflowId) {
    const base = "/api/workflows/" + encodeURIComponent(workflowId);
    let last = null;

    async function cancel(path, what) {
      if (!window.confirm(`Cancel the unfinished jobs of ${what}?`)) return;
      $("message").textContent = "";
      try {
        const answer = await api(path, { method: "POST" });
        const jobs = answer.cancelled === 1 ? "job" : "jobs";
        $("message").textContent = `cancelled ${answer.cancelled} ${jobs} of ${what}`;
      } catch (error) {
        if (error instanceof Unauthorized) {
          $("message").textContent = "cancel refused: the service token is missing or wrong";
          askForToken(Boolean(token()));
        } else {
          $("message").textContent = "cancel failed: " + error.message;
        }
      }
    }

    $("cancel-workflow").addEventListener("click", () =>
      cancel(base + "/cancel", "workflow " + workflowId),
    );
    $("direction").addEventListener("change", () => last && drawBest(last));

    function drawSummary(answer) {
      const wf = answer.workflow;
      $("wf-name").textContent = wf.name;
      document.title = `${wf.name} (${wf.status}) - idds-fat`;
      $("wf-summary").textContent =
        `${wf.status} · ${wf.jobs} jobs in ${wf.tasks} tasks: ${stateCounts(wf.job_states)}` +
        ` · backend ${wf.backend || "-"} · created ${when(wf.created)}` +
        ` · updated ${when(wf.updated)}`;
      $("wf-summary").dataset.status = wf.status;
      const unfinished = wf.jobs - finishedCount(wf.job_states);
      $("cancel-workflow").disabled = unfinished === 0;
    }

    function drawTasks(answer) {
      const tbody = $("tasks").tBodies[0];
      const keys = new Set();
      answer.tasks.forEach((task, i) => {
        keys.add(task.id);
        const row = keyedRow(tbody, task.id);
        cell(row, 0, i + 1);
        cell(row, 1, task.id);
        cell(row, 2, task.name);
        cell(row, 3, task.function);
        cell(row, 4, task.jobs);
        STATES.forEach((s, k) => {
          const count = task.job_states[s] || 0;
          const target = cell(row, 5 + k, count);
          target.className = count ? "count " + s : "count zero";
          target.dataset.state = s;
        });
        const values = task.values;
        const best = values ? ($("direction").value === "max" ? values.max : values.min) : null;
        cell(row, 5 + STATES.length, number(best));
        const actions = cell(row, 6 + STATES.length, null);
        let button = actions.querySelector("button");
        if (!button) {
          button = document.createElement("button");
          button.type = "button";
          button.className = "danger small";
          button.textContent = "Cancel";
          button.dataset.task = task.id;
          button.addEventListener("click", () =>
            cancel(`${base}/tasks/${encodeURIComponent(task.id)}/cancel`, "task " + task.id),
          );
          actions.appendChild(button);
        }
        button.disabled = task.jobs - finishedCount(task.job_states) === 0;
      });
      dropOtherRows(tbody, keys);
    }

    function drawTimeline(answer) {
      const svg = $("timeline");
      const jobs = answer.timeline.jobs;
      svg.replaceChildren();
      const shown = jobs.length < answer.timeline.total;
      $("timeline-note").textContent = shown
        ? `(the last ${jobs.length} of ${answer.timeline.total} jobs)`
        : "";
      if (!jobs.length) return;
      const width = 640;
      const label = 90;
      // Readable rows for a few jobs; for many, the whole timeline stays in ~500 px.
      const rowHeight = jobs.length > 40 ? Math.max(1, 500 / jobs.length) : 13;
      const height = jobs.length * rowHeight + 32;
      svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      svg.setAttribute("height", String(height));
      // A finished workflow's timeline ends where it ended; a running one's, now.
      const stop = answer.timeline.end ?? answer.now;
      const start = Math.min(...jobs.map((j) => j.queued ?? stop));
      const end = Math.max(stop, ...jobs.map((j) => j.ended ?? stop));
      const span = Math.max(end - start, 1e-3);
      const x = (t) => label + ((t - start) / span) * (width - label - 4);
      jobs.forEach((job, i) => {
        const y = i * rowHeight;
        const group = svgNode(svg, "g", {
          class: "job " + job.status,
          "data-job-id": `${job.task}/${job.job}`,
          tabindex: "0",
        });
        const title = svgNode(group, "title");
        title.textContent = `${job.task}/${job.job} ${job.name}: ${job.status}`;
        // The whole row answers clicks: a job of a millisecond has a bar too thin to hit.
        svgNode(group, "rect", { x: 0, y, width, height: rowHeight, class: "hit" });
        if (rowHeight >= 9) {
          const text = svgNode(group, "text", { x: 0, y: y + rowHeight - 1, class: "label" });
          text.textContent = `${job.task}/${job.job}`;
        }
        const queued = job.queued ?? stop;
        const started = job.started ?? (job.status === "running" ? queued : job.ended);
        const ended = job.ended ?? stop;
        // Waiting: from submission to start (or to now, or to a cancel before it ran).
        svgNode(group, "rect", {
          x: x(queued),
          y: y + rowHeight * 0.35,
          width: Math.max(x(started ?? ended) - x(queued), 0.5),
          height: Math.max(rowHeight * 0.3, 1),
          class: "wait",
        });
        if (started !== null && started !== undefined && job.status !== "queued") {
          svgNode(group, "rect", {
            x: x(started),
            y: y + 1,
            width: Math.max(x(ended) - x(started), 1.5),
            height: Math.max(rowHeight - 2, 1),
            class: "run",
          });
        }
        group.addEventListener("click", () => showJob(job.task, job.job));
        group.addEventListener("keydown", (event) => {
          if (event.key === "Enter") showJob(job.task, job.job);
        });
      });
      drawTimeAxis(svg, x, start, span, jobs.length * rowHeight, width, label);
    }

    // Ticks every 1, 2 or 5 × 10^k seconds, about six of them, labelled in seconds
    // since the first submission; the first label is the clock time it started.
    function drawTimeAxis(svg, x, start, span, top, width, label) {
      const axis = svgNode(svg, "g", { class: "time-axis" });
      svgNode(axis, "line", {
        x1: label, y1: top + 2, x2: width - 4, y2: top + 2, class: "axis-line",
      });
      const rough = span / 6;
      const power = 10 ** Math.floor(Math.log10(rough));
      const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
      const digits = step < 1 ? Math.min(3, -Math.floor(Math.log10(step))) : 0;
      for (let k = 0; k * step <= span * (1 + 1e-9); k += 1) {
        const t = k * step;
        const at = x(start + t);
        svgNode(axis, "line", { x1: at, y1: top + 2, x2: at, y2: top + 6, class: "tick" });
        const text = svgNode(axis, "text", {
          x: at, y: top + 18, class: "axis tick-label", "text-anchor": k === 0 ? "start" : "middle",
        });
        text.textContent = k === 0
          ? new Date(start * 1000).toLocaleTimeString()
          : `+${t.toFixed(digits)} s`;
      }
    }

    // The table of trials: one row per job on the timeline, sortable by value.
    let valueOrder = "none";
    $("sort-value").addEventListener("click", () => {
      valueOrder = valueOrder === "asc" ? "desc" : "asc";
      $("sort-value").dataset.order = valueOrder;
      $("sort-value").textContent = valueOrder === "asc" ? "Value ▲" : "Value ▼";
      if (last) drawTrials(last);
    });

    function drawTrials(answer) {
      const tbody = $("trials").tBodies[0];
      const jobs = answer.timeline.jobs.slice();
      if (valueOrder !== "none") {
        const sign = valueOrder === "asc" ? 1 : -1;
        // Jobs without a value (yet) go last either way.
        jobs.sort((a, b) => {
          if (a.value === null || b.value === null) return (a.value === null) - (b.value === null);
          return sign * (a.value - b.value);
        });
      }
      const keys = new Set();
      jobs.forEach((job, i) => {
        const key = `${job.task}/${job.job}`;
        keys.add(key);
        const row = keyedRow(tbody, key);
        if (!row.dataset.wired) {
          row.dataset.wired = "1";
          row.tabIndex = 0;
          row.addEventListener("click", () => showJob(job.task, job.job));
        }
        cell(row, 0, key);
        cell(row, 1, job.arguments ?? "");
        cell(row, 2, job.status).className = "status " + job.status;
        cell(row, 3, number(job.value)).className = "value";
        if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] || null);
      });
      dropOtherRows(tbody, keys);
    }

    function drawBest(answer) {
      const svg = $("best");
      svg.replaceChildren();
      const maximize = $("direction").value === "max";
      const points = [];
      let best = null;
      answer.tasks.forEach((task, i) => {
        if (!task.values) return;
        const value = maximize ? task.values.max : task.values.min;
        best = best === null ? value : maximize ? Math.max(best, value) : Math.min(best, value);
        points.push({ iteration: i + 1, value, best });
      });
      $("best-note").hidden = points.length > 0;
      if (!points.length) return;
      const width = 420;
      const height = 220;
      const pad = { left: 60, right: 10, top: 10, bottom: 30 };
      svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
      const values = points.flatMap((p) => [p.value, p.best]);
      let low = Math.min(...values);
      let high = Math.max(...values);
      if (low === high) {
        low -= 1;
        high += 1;
      }
      const last = answer.tasks.length;
      const x = (n) => pad.left + ((n - 1) / Math.max(last - 1, 1)) * (width - pad.left - pad.right);
      const y = (v) => pad.top + ((high - v) / (high - low)) * (height - pad.top - pad.bottom);
      svgNode(svg, "line", {
        x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom,
        class: "axis-line",
      });
      svgNode(svg, "line", {
        x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, class: "axis-line",
      });
      for (const [v, anchor] of [[high, pad.top + 8], [low, height - pad.bottom]]) {
        svgNode(svg, "text", { x: 2, y: anchor, class: "axis" }).textContent = number(v);
      }
      svgNode(svg, "text", { x: pad.left, y: height - 8, class: "axis" }).textContent =
        "iteration 1";
      svgNode(svg, "text", { x: width - 80, y: height - 8, class: "axis" }).textContent =
        `iteration ${last}`;
      // A step line: the best value holds until an iteration beats it.
      let path = "";
      points.forEach((p, i) => {
        path += i === 0 ? `M${x(p.iteration)},${y(p.best)}` : ` H${x(p.iteration)} V${y(p.best)}`;
      });
      path += ` H${x(last)}`;
      svgNode(svg, "path", { d: path, class: "best-line" });
      for (const p of points) {
        const dot = svgNode(svg, "circle", {
          cx: x(p.iteration), cy: y(p.value), r: 3, class: "point",
        });
        svgNode(dot, "title").textContent =
          `iteration ${p.iteration}: ${number(p.value)} (best so far ${number(p.best)})`;
      }
      svg.dataset.best = String(best);
    }

    async function showJob(task, job) {
      const section = $("job");
      section.hidden = false;
      $("job-title").textContent = `${task}/${job}`;
      try {
        const answer = await api(`${base}/tasks/${encodeURIComponent(task)}/jobs/${job}`);
        $("job-summary").textContent =
          `${answer.name}: ${answer.status}` +
          (answer.returncode === null ? "" : `, exit code ${answer.returncode}`) +
          (answer.value === null ? "" : `, value ${number(answer.value)}`) +
          (answer.depends && answer.depends.length
            ? ` · takes the values of ${answer.depends.join(", ")}`
            : "") +
          ` · started ${when(answer.started)} · ended ${when(answer.ended)}`;
        $("job-arguments").textContent = answer.arguments ?? "(not recorded)";
        $("job-error").textContent = answer.error || "(none)";
        const stderr = answer.stderr_tail;
        $("job-stderr").textContent =
          stderr === null ? "(no stderr file)" : stderr || "(empty)";
      } catch (error) {
        if (error instanceof Unauthorized) askForToken(Boolean(token()));
        $("job-summary").textContent = "could not load this job: " + error.message;
      }
    }

    poll(
      () => api(base),
      (answer) => {
        last = answer;
        drawSummary(answer);
        drawTasks(answer);
        drawTimeline(answer);
        drawBest(answer);
        drawTrials(answer);
      },
    );
  }

  document.addEventListener("DOMContentLoaded", () => {
    takeTokenFromFragment();
    const page = document.body.dataset.page;
    if (page === "index") poll(() => api("/api/workflows"), drawWorkflows);
    if (page === "workflow") workflowPage(document.body.dataset.workflow);
  });
})();
