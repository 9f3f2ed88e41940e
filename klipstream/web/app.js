// KlipStream Analysis web page: plain JavaScript, no build step, no requests off this server.
// The job view follows the job's Server-Sent-Events stream; the list polls /api/v1/jobs.
"use strict";

(() => {
  const JOBS_POLL_MS = 4000;
  const ADMIN_POLL_MS = 5000;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const NOT_REQUESTED = "not requested for this job";
  // Artifacts made per highlight (key `{family}_{rank}`) are offered on the highlight's row instead.
  const PER_HIGHLIGHT = /^(clip|vertical|thumbnail|clip_srt|clip_vtt)_\d+$/;
  const $ = (id) => document.getElementById(id);

  // --- small helpers ----------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "style") node.style.cssText = value;  // CSSOM, allowed by the page's CSP
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function hms(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) return "–";
    const s = Math.round(seconds);
    const pad = (n) => String(n).padStart(2, "0");
    return `${pad(Math.floor(s / 3600))}:${pad(Math.floor((s % 3600) / 60))}:${pad(s % 60)}`;
  }

  function friendlyDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    if (seconds < 1) return "less than a second left";
    if (seconds < 90) return `about ${Math.round(seconds)} s left`;
    if (seconds < 5400) return `about ${Math.round(seconds / 60)} min left`;
    return `about ${(seconds / 3600).toFixed(1)} h left`;
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (!isFinite(t)) return "";
    const s = Math.max(0, (Date.now() - t) / 1000);
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(t).toLocaleDateString();
  }

  const session = {
    get apiKey() { return sessionStorage.getItem("klipstream.apiKey") || ""; },
    get adminToken() { return sessionStorage.getItem("klipstream.adminToken") || ""; },
    save(apiKey, adminToken) {
      for (const [name, value] of [["klipstream.apiKey", apiKey], ["klipstream.adminToken", adminToken]]) {
        if (value) sessionStorage.setItem(name, value); else sessionStorage.removeItem(name);
      }
    },
  };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, { method = "GET", body, token } = {}) {
    const headers = { Accept: "application/json" };
    const bearer = token !== undefined ? token : session.apiKey;
    if (bearer) headers.Authorization = `Bearer ${bearer}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ApiError(0, "The server cannot be reached. Check your connection.");
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (err) { data = null; }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      if (data && data.title) {
        message = data.detail ? `${data.title}: ${data.detail}` : data.title;
        if (Array.isArray(data.errors) && data.errors.length) {
          message += " (" + data.errors.map((e) => `${e.field}: ${e.message}`).join("; ") + ")";
        }
      }
      if (response.status === 401) message += " Enter an API key under Access.";
      throw new ApiError(response.status, message);
    }
    return data;
  }

  function setMessage(node, text, kind = "") {
    node.textContent = text;
    node.className = "message" + (kind ? " " + kind : "");
  }

  // --- theme ------------------------------------------------------------------------------------
  function applyTheme(theme) {
    if (theme) document.documentElement.dataset.theme = theme;
    else delete document.documentElement.dataset.theme;
    if (current.job && current.waveform) drawWaveform();
  }

  function currentTheme() {
    const chosen = document.documentElement.dataset.theme;
    if (chosen) return chosen;
    return window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  // --- access (API key, admin token) ---------------------------------------------------------------
  function initAccess() {
    $("api-key").value = session.apiKey;
    $("admin-token").value = session.adminToken;
    $("access-form").addEventListener("submit", (event) => {
      event.preventDefault();
      session.save($("api-key").value.trim(), $("admin-token").value.trim());
      $("access").open = false;
      refreshJobs();
      startAdmin();
    });
    $("access-clear").addEventListener("click", () => {
      $("api-key").value = "";
      $("admin-token").value = "";
      session.save("", "");
      startAdmin();
      refreshJobs();
    });
  }

  // --- submit -----------------------------------------------------------------------------------------
  function initSubmit() {
    const form = $("submit-form");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const message = $("submit-message");
      const url = $("vod-url").value.trim();
      const chatUrl = $("chat-url").value.trim();
      if (!url) {
        setMessage(message, "Enter the URL of a VOD.", "bad");
        $("vod-url").focus();
        return;
      }
      const body = { url, priority: $("priority").value };
      if (chatUrl) body.chat_url = chatUrl;
      if ($("want-clips").checked) body.options = { clips: { vertical: $("want-vertical").checked } };
      $("submit-button").disabled = true;
      setMessage(message, "Submitting…");
      try {
        const answer = await api("/api/v1/analysis", { method: "POST", body });
        setMessage(message, answer.deduplicated ? "This video is already being analysed; showing that job."
          : `Queued as job ${answer.job_id}.`, "ok");
        $("vod-url").value = "";
        $("chat-url").value = "";
        openJob(answer.job_id, answer);
        refreshJobs();
      } catch (err) {
        setMessage(message, err.message, "bad");
      } finally {
        $("submit-button").disabled = false;
      }
    });
  }

  // --- recent jobs ---------------------------------------------------------------------------------
  let jobsTimer = null;

  async function refreshJobs() {
    clearTimeout(jobsTimer);
    try {
      const page = await api("/api/v1/jobs?limit=20");
      renderJobs(page.jobs);
      setMessage($("jobs-message"), page.jobs.length ? "" : "No jobs yet.");
      $("jobs-updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      setMessage($("jobs-message"), err.message, "bad");
    }
    jobsTimer = setTimeout(refreshJobs, document.hidden ? JOBS_POLL_MS * 4 : JOBS_POLL_MS);
  }

  function renderJobs(jobs) {
    const list = $("jobs");
    list.replaceChildren(...jobs.map((job) => {
      const p = job.progress || {};
      const bar = el("div", { class: `bar mini ${job.status}`, "aria-hidden": "true" },
        el("span", { style: `width:${p.percentage || 0}%` }));
      const button = el("button", {
        type: "button",
        "aria-current": current.id === job.job_id ? "true" : null,
        "aria-label": `Job ${job.job_id}, ${job.status}, ${Math.round(p.percentage || 0)} percent`,
        onclick: () => openJob(job.job_id),
      },
      el("span", { class: "jid", text: job.video_id }),
      el("span", { class: `badge ${job.status}`, text: job.status }),
      el("span", { class: "jsub", text: `${p.current_stage || ""} · ${Math.round(p.percentage || 0)}% · ${ago(job.updated_at)}` }),
      bar);
      return el("li", {}, button);
    }));
  }

  // --- the job view --------------------------------------------------------------------------------
  const current = {
    id: null, job: null, source: null, reopenTimer: null, stageRates: {}, waveform: null,
    transcript: null, stopAt: null, playingRow: null, resultsFor: null, failures: 0,
  };

  function openJob(jobId, seed) {
    closeStream();
    Object.assign(current, {
      id: jobId, job: null, stageRates: {}, waveform: null, transcript: null, resultsFor: null, failures: 0,
    });
    if (location.hash !== `#job=${jobId}`) history.replaceState(null, "", `#job=${jobId}`);
    $("job-empty").hidden = true;
    $("job-body").hidden = false;
    $("results").hidden = true;
    $("job-error").hidden = true;
    $("stages").replaceChildren();
    $("job-title").textContent = `Job ${jobId}`;
    $("job-sub").textContent = "";
    for (const button of document.querySelectorAll("#jobs button")) {
      button.setAttribute("aria-current", button.getAttribute("aria-label").includes(jobId) ? "true" : "false");
    }
    if (seed) renderJob({ ...seed, stages: [] });
    api(`/api/v1/analysis/${encodeURIComponent(jobId)}`).then((job) => {
      if (current.id !== jobId) return;
      renderJob(job);
      follow(job.stream_url);
    }).catch((err) => {
      setConn(err.message, true);
    });
  }

  function closeStream() {
    clearTimeout(current.reopenTimer);
    if (current.source) current.source.close();
    current.source = null;
  }

  function setConn(text, bad = false) {
    const node = $("conn");
    node.textContent = text;
    node.className = "conn" + (bad ? " bad" : "");
  }

  function follow(streamUrl) {
    closeStream();
    const jobId = current.id;
    const source = new EventSource(streamUrl);
    current.source = source;
    const handle = (type) => (event) => {
      if (current.source !== source) return;
      let data;
      try { data = JSON.parse(event.data); } catch (err) { return; }
      current.failures = 0;
      if (type === "reconnect") {
        // The server is restarting: come back after the hinted delay (a fresh snapshot follows).
        source.close();
        setConn("Server restarting, reconnecting…", true);
        current.reopenTimer = setTimeout(() => { if (current.id === jobId) follow(streamUrl); }, data.retry_ms || 3000);
        return;
      }
      setConn("Live");
      if (type === "progress") applyProgress(data);
      else renderJob(type === "stage" ? { ...current.job, ...data } : data);
      if (TERMINAL.has(type)) {
        source.close();
        setConn("");
        refreshJobs();
      }
    };
    for (const type of ["snapshot", "stage", "progress", "completed", "failed", "cancelled", "reconnect"]) {
      source.addEventListener(type, handle(type));
    }
    source.onopen = () => { if (current.source === source) setConn("Live"); };
    source.onerror = () => {
      if (current.source !== source) return;
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (e.g. an HTTP error): retry ourselves with a growing delay.
        current.failures += 1;
        const delay = Math.min(30000, 1000 * 2 ** Math.min(current.failures, 5));
        setConn(`Connection lost, retrying in ${Math.round(delay / 1000)} s…`, true);
        current.reopenTimer = setTimeout(() => { if (current.id === jobId) openJob(jobId); }, delay);
      } else {
        setConn("Connection lost, reconnecting…", true);  // EventSource resends Last-Event-ID itself
      }
    };
  }

  function applyProgress(data) {
    if (!current.job) return;
    const job = current.job;
    job.status = data.status || job.status;
    job.progress = data.progress || job.progress;
    for (const update of data.stages || []) {
      const stage = (job.stages || []).find((s) => s.name === update.name);
      if (stage) Object.assign(stage, update, { status: "running" });
    }
    renderJob(job);
  }

  function renderJob(job) {
    current.job = job;
    const status = job.status;
    const progress = job.progress || {};
    const video = job.video || {};
    $("job-title").textContent = video.title || `Job ${job.job_id}`;
    const sub = [video.channel, video.duration_seconds ? hms(video.duration_seconds) : null, job.url]
      .filter(Boolean).join(" · ");
    $("job-sub").textContent = sub;
    const badge = $("job-badge");
    badge.textContent = status;
    badge.className = `badge ${status}`;
    const pct = Math.max(0, Math.min(100, progress.percentage || 0));
    const overall = $("overall-bar");
    overall.className = `bar big ${status}`;
    overall.setAttribute("aria-valuenow", String(Math.round(pct)));
    overall.firstElementChild.style.width = `${pct}%`;
    let label = `${progress.current_stage || status} · ${pct.toFixed(0)}%`;
    if (status === "queued" && job.queue_position) label += ` · position ${job.queue_position} in the queue`;
    $("overall-label").textContent = label;
    $("overall-eta").textContent = TERMINAL.has(status) ? "" : friendlyDuration(progress.estimated_completion_seconds);
    const live = `${status}: ${progress.current_stage || ""}, ${Math.round(pct / 10) * 10} percent`;
    if ($("job-live").textContent !== live) $("job-live").textContent = live;  // announce in steps, not every tick
    renderStages(job.stages || []);
    $("cancel-button").hidden = TERMINAL.has(status);
    $("retry-button").hidden = !(status === "failed" || status === "cancelled");
    const errorBox = $("job-error");
    if (status === "failed" && job.error) {
      errorBox.hidden = false;
      const where = job.error.stage ? ` (stage ${job.error.stage})` : "";
      $("error-message").textContent = job.error.message + where;
      $("error-action").textContent = job.error.suggested_action || "";
    } else {
      errorBox.hidden = true;
    }
    $("job-warnings").replaceChildren(...(job.warnings || []).map((w) => el("li", { text: w })));
    if (status === "completed" && current.resultsFor !== job.job_id) {
      current.resultsFor = job.job_id;
      renderResults(job);
    } else if (status !== "completed") {
      $("results").hidden = true;
    }
  }

  function renderStages(stages) {
    const list = $("stages");
    const now = Date.now();
    for (const stage of stages) {
      // An opt-in stage this job did not ask for (clips) is noise, not progress.
      let row = list.querySelector(`[data-name="${CSS.escape(stage.name)}"]`);
      if (stage.status === "skipped" && stage.message === NOT_REQUESTED) {
        if (row) row.remove();
        continue;
      }
      if (!row) {
        row = el("li", { class: "stage", "data-name": stage.name },
          el("span", { class: "sname" }),
          el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
            "aria-label": `${stage.name.replace(/_/g, " ")} progress` }, el("span")),
          el("span", { class: "sinfo" }),
          el("span", { class: "smsg" }));
        list.append(row);
      }
      const fraction = stage.status === "completed" ? 1 : Math.max(0, Math.min(1, stage.progress || 0));
      row.dataset.status = stage.status;
      const label = stage.name.replace(/_/g, " ");
      row.querySelector(".sname").textContent = label.charAt(0).toUpperCase() + label.slice(1);
      row.querySelector(".sname").title = `${stage.display || ""} (${stage.name})`;
      const bar = row.querySelector(".bar");
      bar.className = `bar ${stage.status}`;
      bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
      bar.firstElementChild.style.width = `${fraction * 100}%`;
      row.querySelector(".sinfo").textContent = stageInfo(stage, fraction, now);
      const message = stage.error ? stage.error.message : stage.message || "";
      row.querySelector(".smsg").textContent = message;
    }
  }

  // A stage's ETA from its own measured rate since we first saw it running.
  function stageInfo(stage, fraction, now) {
    if (stage.status === "completed") {
      const start = Date.parse(stage.started_at);
      const end = Date.parse(stage.finished_at);
      return isFinite(start) && isFinite(end) ? `done in ${hms((end - start) / 1000)}` : "done";
    }
    if (stage.status !== "running") return stage.status;
    let rate = current.stageRates[stage.name];
    if (!rate || fraction < rate.fraction) rate = current.stageRates[stage.name] = { at: now, fraction };
    const elapsed = (now - rate.at) / 1000;
    const gained = fraction - rate.fraction;
    let text = `${Math.round(fraction * 100)}%`;
    if (elapsed > 1.5 && gained > 0.005) text += ` · ${hms((elapsed * (1 - fraction)) / gained)} left`;
    return text;
  }

  async function cancelJob() {
    if (!current.id) return;
    $("cancel-button").disabled = true;
    try {
      await api(`/api/v1/analysis/${encodeURIComponent(current.id)}`, { method: "DELETE" });
      setConn("Cancellation requested…");
    } catch (err) {
      setConn(err.message, true);
    } finally {
      $("cancel-button").disabled = false;
    }
  }

  async function retryJob() {
    if (!current.id) return;
    const jobId = current.id;
    $("retry-button").disabled = true;
    try {
      await api(`/api/v1/analysis/${encodeURIComponent(jobId)}/retry`, { method: "POST" });
      openJob(jobId);
      refreshJobs();
    } catch (err) {
      setConn(err.message, true);
    } finally {
      $("retry-button").disabled = false;
    }
  }

  // --- results: waveform, highlights, transcript, artifacts -----------------------------------------
  function renderResults(job) {
    $("results").hidden = false;
    const results = job.results || {};
    const player = $("player");
    player.hidden = !results.audio;
    if (results.audio) player.src = results.audio; else player.removeAttribute("src");
    renderHighlights(job.highlights || [], results);
    renderArtifacts(results);
    current.waveform = null;
    drawWaveform();
    if (results.waveform) {
      fetch(results.waveform).then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
        .then((values) => {
          if (current.resultsFor !== job.job_id) return;
          current.waveform = Array.isArray(values) ? values : null;
          drawWaveform();
        }).catch(() => {});
    }
    $("transcript-section").hidden = !results.transcript_json;
    $("transcript").replaceChildren();
    $("transcript-count").textContent = "";
    if (results.transcript_json) {
      fetch(results.transcript_json).then((r) => (r.ok ? r.json() : Promise.reject(new Error(`HTTP ${r.status}`))))
        .then((doc) => {
          if (current.resultsFor !== job.job_id) return;
          current.transcript = (doc && doc.segments) || [];
          renderTranscript();
        }).catch((err) => { $("transcript-count").textContent = `Could not load the transcript (${err.message}).`; });
    }
  }

  function mediaDuration() {
    const job = current.job || {};
    if (job.video && job.video.duration_seconds) return job.video.duration_seconds;
    const player = $("player");
    if (isFinite(player.duration) && player.duration > 0) return player.duration;
    const ends = (job.highlights || []).map((h) => h.end_time || 0);
    return ends.length ? Math.max(...ends) : 0;
  }

  function drawWaveform() {
    const canvas = $("waveform");
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    const ctx = canvas.getContext("2d");
    const style = getComputedStyle(document.documentElement);
    const color = (name) => style.getPropertyValue(name).trim();
    ctx.clearRect(0, 0, width, height);
    const values = current.waveform;
    const duration = mediaDuration();
    const mid = height / 2;
    // highlight regions under the waveform
    const highlights = (current.job && current.job.highlights) || [];
    if (duration > 0) {
      ctx.font = `${11 * ratio}px system-ui, sans-serif`;
      for (const h of highlights) {
        const x0 = (h.start_time / duration) * width;
        const x1 = Math.max(x0 + 2 * ratio, (h.end_time / duration) * width);
        ctx.fillStyle = color("--mark");
        ctx.fillRect(x0, 0, x1 - x0, height);
        ctx.fillStyle = color("--mark-edge");
        ctx.fillRect(x0, 0, Math.max(1, ratio), height);
        ctx.fillText(String(h.rank), x0 + 3 * ratio, 12 * ratio);
      }
    }
    if (!values || !values.length) {
      ctx.fillStyle = color("--muted");
      ctx.font = `${12 * ratio}px system-ui, sans-serif`;
      ctx.fillText(values ? "No waveform data" : "Loading waveform…", 10 * ratio, mid);
      return;
    }
    // one column per device pixel: the peak of the values it covers
    const player = $("player");
    const played = duration > 0 ? (player.currentTime / duration) * width : 0;
    const per = values.length / width;
    for (let x = 0; x < width; x++) {
      const a = Math.floor(x * per);
      const b = Math.max(a + 1, Math.floor((x + 1) * per));
      let peak = 0;
      for (let i = a; i < b && i < values.length; i++) if (values[i] > peak) peak = values[i];
      const h = Math.max(ratio, peak * (height - 8 * ratio));
      ctx.fillStyle = x < played ? color("--wave") : color("--wave-dim");
      if (!played) ctx.fillStyle = color("--wave");
      ctx.fillRect(x, mid - h / 2, 1, h);
    }
    if (played > 0) {
      ctx.fillStyle = color("--text");
      ctx.fillRect(played, 0, Math.max(1, ratio), height);
    }
  }

  function renderHighlights(highlights, results = {}) {
    const body = $("highlights").tBodies[0];
    $("no-highlights").hidden = highlights.length > 0;
    const anyClips = highlights.some((h) => results[`clip_${h.rank}`]);
    $("clip-col").hidden = !anyClips;
    if (!anyClips) closeClip();
    body.replaceChildren(...highlights.map((h) => {
      const score = typeof h.score === "number" ? h.score : h.highlight_score;
      const row = el("tr", {
        tabindex: "0",
        "aria-label": `Play highlight ${h.rank}, ${hms(h.start_time)} to ${hms(h.end_time)}`,
        onclick: () => playRange(h.start_time, h.end_time, row),
        onkeydown: (event) => {
          if (event.key === "Enter" || event.key === " ") { event.preventDefault(); playRange(h.start_time, h.end_time, row); }
        },
      },
      el("td", { class: "num", text: String(h.rank ?? "") }),
      el("td", { class: "time", text: `${hms(h.start_time)}–${hms(h.end_time)}` }),
      el("td", { class: "num", text: typeof score === "number" ? score.toFixed(3) : "" }),
      el("td", {}, el("span", { class: "emotion", text: h.dominant_emotion || "" })),
      el("td", { text: h.reason || h.why || "" }),
      anyClips ? clipCell(h, results) : null);
      return row;
    }));
  }

  // Play clip / download clip / download vertical / captions for one highlight.
  function clipCell(h, results) {
    const n = h.rank;
    const clip = results[`clip_${n}`];
    const cell = el("td", { class: "clip-actions" });
    if (!clip) return cell;
    const stop = (event) => event.stopPropagation();  // the row itself plays the moment in the audio
    cell.addEventListener("click", stop);
    cell.addEventListener("keydown", stop);
    const link = (href, text, label) => el("a", { href, download: "", class: "chip", text, "aria-label": label });
    cell.append(
      el("button", { type: "button", class: "chip", text: "▶ Play clip", "aria-label": `Play clip ${n}`,
        onclick: () => playClip(n, results) }),
      link(clip, "Clip", `Download clip ${n}`));
    if (results[`vertical_${n}`]) cell.append(link(results[`vertical_${n}`], "Vertical", `Download vertical clip ${n}`));
    if (results[`clip_srt_${n}`]) cell.append(link(results[`clip_srt_${n}`], "SRT", `Download captions of clip ${n} (SRT)`));
    if (results[`clip_vtt_${n}`]) cell.append(link(results[`clip_vtt_${n}`], "VTT", `Download captions of clip ${n} (WebVTT)`));
    return cell;
  }

  function playClip(n, results) {
    const video = $("clip-player");
    $("player").pause();
    video.replaceChildren();
    video.src = results[`clip_${n}`];
    if (results[`thumbnail_${n}`]) video.poster = results[`thumbnail_${n}`]; else video.removeAttribute("poster");
    const captions = results[`clip_vtt_${n}`];
    if (captions && new URL(captions, location.href).origin === location.origin) {
      video.append(el("track", { kind: "captions", src: captions, srclang: "en", label: "Captions", default: true }));
    }
    $("clip-title").textContent = `Clip ${n}`;
    $("clip-view").hidden = false;
    video.play().catch(() => {});
  }

  function closeClip() {
    const video = $("clip-player");
    video.pause();
    video.removeAttribute("src");
    video.replaceChildren();
    $("clip-view").hidden = true;
  }

  function playRange(start, end, row) {
    const player = $("player");
    if (!player.src) return;
    for (const r of $("highlights").tBodies[0].rows) r.classList.toggle("playing", r === row);
    current.stopAt = typeof end === "number" ? end : null;
    player.currentTime = Math.max(0, start || 0);
    player.play().catch(() => {});
  }

  function onTimeUpdate() {
    const player = $("player");
    if (current.stopAt !== null && player.currentTime >= current.stopAt) {
      player.pause();
      current.stopAt = null;
      for (const r of $("highlights").tBodies[0].rows) r.classList.remove("playing");
    }
    drawWaveform();
  }

  function renderTranscript() {
    const query = $("transcript-search").value.trim().toLowerCase();
    const segments = current.transcript || [];
    const container = $("transcript");
    const shown = [];
    let hits = 0;
    for (const seg of segments) {
      const text = (seg.text || "").trim();
      if (query && !text.toLowerCase().includes(query)) continue;
      const p = el("p", {}, el("button", {
        type: "button", text: hms(seg.start), "aria-label": `Play from ${hms(seg.start)}`,
        onclick: () => playRange(seg.start, null, null),
      }));
      const span = el("span");
      if (query) {
        const lower = text.toLowerCase();
        let i = 0;
        for (let at = lower.indexOf(query); at !== -1; at = lower.indexOf(query, i)) {
          span.append(text.slice(i, at), el("mark", { text: text.slice(at, at + query.length) }));
          i = at + query.length;
          hits += 1;
        }
        span.append(text.slice(i));
      } else {
        span.textContent = text;
      }
      p.append(span);
      shown.push(p);
      if (shown.length >= 5000) break;  // keep the page responsive on very long streams
    }
    container.replaceChildren(...shown);
    if (!segments.length) container.replaceChildren(el("p", { class: "muted", text: "Nothing was said." }));
    const plural = (n, word, many) => `${n} ${n === 1 ? word : many}`;
    $("transcript-count").textContent = query
      ? `${plural(hits, "match", "matches")} in ${plural(shown.length, "segment", "segments")}`
      : plural(segments.length, "segment", "segments");
  }

  function renderArtifacts(results) {
    const names = Object.keys(results).filter((key) => !PER_HIGHLIGHT.test(key)).sort();
    $("artifacts").replaceChildren(...names.map((key) => el("li", {},
      el("a", { href: results[key], target: "_blank", rel: "noopener", download: "", text: key.replace(/_/g, " ") }))));
  }

  // --- admin ------------------------------------------------------------------------------------------
  let adminTimer = null;

  function startAdmin() {
    clearTimeout(adminTimer);
    const section = $("admin");
    if (!session.adminToken) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    refreshAdmin();
  }

  async function refreshAdmin() {
    clearTimeout(adminTimer);
    if (!session.adminToken) return;
    try {
      const stats = await api("/api/v1/queue/stats", { token: session.adminToken });
      renderAdmin(stats);
      setMessage($("admin-message"), stats.paused ? (stats.draining ? "Draining: not taking work." : "Paused.") : "");
      $("admin-updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      setMessage($("admin-message"), err.status === 401 ? "The admin token was refused." : err.message, "bad");
    }
    adminTimer = setTimeout(refreshAdmin, ADMIN_POLL_MS);
  }

  function renderAdmin(stats) {
    const stat = (value, label) => el("div", { class: "stat" }, el("b", { text: String(value) }), el("span", { text: label }));
    const queued = stats.queued || {};
    const last = stats.last_hour || {};
    const tiles = el("div", { class: "stats" },
      stat(stats.queued_total, "queued"),
      stat((stats.running || []).length, "running"),
      stat(stats.oldest_queued_age_seconds === null ? "–" : hms(stats.oldest_queued_age_seconds), "oldest waiting"),
      stat(last.completed || 0, "completed (1 h)"),
      stat(last.failed || 0, "failed (1 h)"),
      stat(last.cancelled || 0, "cancelled (1 h)"));
    const byPriority = el("p", { class: "small muted",
      text: "Queued by priority: " + ["urgent", "high", "normal", "low"].map((p) => `${p} ${queued[p] || 0}`).join(" · ") });
    const meters = Object.entries(stats.resources || {}).map(([name, r]) => el("div", { class: "meter" },
      el("span", { text: name }),
      el("div", { class: "bar", role: "progressbar", "aria-label": `${name} in use`, "aria-valuemin": "0",
        "aria-valuemax": String(r.limit), "aria-valuenow": String(r.in_use) },
      el("span", { style: `width:${r.limit ? (100 * r.in_use) / r.limit : 0}%` })),
      el("span", { class: "n", text: `${r.in_use}/${r.limit}` })));
    const durations = Object.entries(stats.stage_durations || {});
    const table = durations.length ? el("table", {},
      el("thead", {}, el("tr", {}, el("th", { text: "Stage" }), el("th", { class: "num", text: "p50" }),
        el("th", { class: "num", text: "p95" }))),
      el("tbody", {}, ...durations.map(([name, d]) => el("tr", {}, el("td", { text: name }),
        el("td", { class: "num", text: `${(d.p50 ?? 0).toFixed(1)} s` }),
        el("td", { class: "num", text: `${(d.p95 ?? 0).toFixed(1)} s` }))))) : null;
    $("admin-stats").replaceChildren(tiles, byPriority, ...meters, table || "");
  }

  // --- start ------------------------------------------------------------------------------------------
  function init() {
    const saved = localStorage.getItem("klipstream.theme");
    if (saved) applyTheme(saved);
    $("theme-toggle").addEventListener("click", () => {
      const next = currentTheme() === "dark" ? "light" : "dark";
      localStorage.setItem("klipstream.theme", next);
      applyTheme(next);
    });
    initAccess();
    initSubmit();
    $("want-clips").addEventListener("change", () => {
      $("want-vertical").disabled = !$("want-clips").checked;
      if (!$("want-clips").checked) $("want-vertical").checked = false;
    });
    $("cancel-button").addEventListener("click", cancelJob);
    $("retry-button").addEventListener("click", retryJob);
    $("transcript-search").addEventListener("input", renderTranscript);
    $("clip-close").addEventListener("click", closeClip);
    const player = $("player");
    player.addEventListener("timeupdate", onTimeUpdate);
    player.addEventListener("loadedmetadata", drawWaveform);
    $("waveform").addEventListener("click", (event) => {
      const duration = mediaDuration();
      if (!duration || !player.src) return;
      const rect = event.currentTarget.getBoundingClientRect();
      playRange(((event.clientX - rect.left) / rect.width) * duration, null, null);
    });
    new ResizeObserver(() => { if (!$("results").hidden) drawWaveform(); }).observe($("waveform"));
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => drawWaveform());
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshJobs(); });
    const match = location.hash.match(/^#job=([A-Za-z0-9_-]+)$/);
    if (match) openJob(match[1]);
    refreshJobs();
    startAdmin();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
