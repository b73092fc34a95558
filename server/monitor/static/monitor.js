// Antiphon monitor page: WebSocket client, canvas drawing (<= 30 frames/s) and controls.
// Messages in: prediction, performer, mixture, surprise, status, dims, models, modes, server, error, learn.
// An event is N values (1..16, the model's dims): the first two on the plane (x across, y up; at N = 1 the one
// value up against time across), the rest as bars beside it, each over its predicted density.
// Messages out: {address, args} controls, checked by the monitor process with the server's own rules.
"use strict";

(() => {
  const FRAME_MS = 1000 / 30;
  const SLOW_FRAME_MS = 250;
  const TRAIL_MS = 4000;
  const TRAIL_MAX = 400;
  const SURPRISE_MS = 30000;
  const GRID = 48;
  const HEAT_MS = 100;  // the heat map and the dt chart follow the model 10 times a second: a 30 fps redraw costs a core
  const DT_MIN = 0.001, DT_MAX = 10;
  const TOUCH_HOLD_MS = 1500;

  const $ = (id) => document.getElementById(id);
  const state = {
    model: {}, performer: {}, mixture: null, heat: null, surprise: [], status: {}, dims: 2,
    dirty: true, ws: null, lastFrame: 0, touched: {},
  };

  // ------------------------------------------------------------------ websocket
  // Beyond loopback the monitor needs its run's token: the page's own address carries it, the WebSocket gets it too.
  const TOKEN = new URLSearchParams(location.search).get("token");
  const WS_URL = `ws://${location.host}/ws` + (TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "");

  function connect() {
    const ws = new WebSocket(WS_URL);
    state.ws = ws;
    ws.onclose = () => { state.ws = null; checkLink(); setTimeout(connect, 1000); };
    ws.onerror = () => {};
    ws.onmessage = (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      const handler = handlers[msg.type];
      if (handler) { handler(msg); state.dirty = true; }
    };
  }

  function send(address, args) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify({ address, args: args || [] }));
    }
  }

  // One trail per voice (key "" when the server plays one voice), so voices never join up.
  function pushTrail(trails, m) {
    const key = m.voice === undefined || m.voice === null ? "" : String(m.voice);
    const trail = trails[key] || (trails[key] = []);
    trail.push({ v: m.values, t: performance.now() });
    if (trail.length > TRAIL_MAX) trail.splice(0, trail.length - TRAIL_MAX);
  }

  function drawTrails(ctx, trails, colour, now, size) {
    for (const key of Object.keys(trails)) {
      drawTrail(ctx, trails[key], colour, now, size, key);
      if (!trails[key].length) delete trails[key];
    }
  }

  function anyTrail(trails) { return Object.keys(trails).length > 0; }

  // A model of another width: what was drawn at the old one goes, and the bars follow.
  function setDims(n) {
    if (!Number.isInteger(n) || n < 1 || n === state.dims) return;
    state.dims = n;
    state.model = {}; state.performer = {}; state.mixture = null; state.heat = null; backgroundFor = undefined;
    $("f-dims").textContent = String(n);
    $("bars").hidden = n <= 2;
    $("bars").style.setProperty("--bars", String(Math.max(0, n - 2)));
  }

  const handlers = {
    prediction: (m) => pushTrail(state.model, m),
    performer: (m) => pushTrail(state.performer, m),
    mixture: (m) => { if (m.dims === state.dims) { state.mixture = m; state.heatStale = true; } },
    dims: (m) => setDims(m.dims),
    surprise: (m) => {
      state.surprise.push({ t: performance.now(), nll: m.nll, smoothed: m.smoothed });
      $("f-surprise").textContent = m.smoothed.toFixed(2);
    },
    status: (m) => { state.status = m.values; setDims(m.values.dims); showStatus(m.values); },
    models: (m) => fillSelect("c-model", m.names, "model"),
    modes: (m) => fillSelect("c-mode", m.names, "mode"),
    server: (m) => { $("server").textContent = `server ${m.address}`; },
    error: (m) => say(`${m.address}: ${m.reason}`, true),
    learn: (m) => say(`${m.address} ${m.args.map(fmt).join(" ")}`, false),
  };

  let serverSeen = 0;
  function setLink(up, what) {
    const el = $("link");
    el.textContent = up ? "live" : `no ${what}`;
    el.className = "badge " + (up ? "on" : "off");
  }

  function say(text, bad) {
    const el = $("message");
    el.textContent = text;
    el.className = bad ? "bad" : "dim";
  }

  // ------------------------------------------------------------------ status and controls
  function fmt(v, digits) {
    if (typeof v !== "number") return String(v);
    if (digits !== undefined) return v.toFixed(digits);
    return Number.isInteger(v) ? String(v) : v.toFixed(3);
  }

  function showStatus(s) {
    serverSeen = performance.now();
    const text = (id, v) => { $(id).textContent = v; };
    text("f-mode", s.mode === undefined ? "–" : s.mode + (Number(s.paused) ? " (paused)" : ""));
    text("f-model", s.model === undefined ? "–" : (s.loading ? `${s.model} → ${s.loading}` : s.model));
    text("f-temperature", s.temperature === undefined ? "–" : fmt(s.temperature, 2));
    text("f-sigma_temperature", s.sigma_temperature === undefined ? "–" : fmt(s.sigma_temperature, 2));
    text("f-timescale", s.timescale === undefined ? "–" : fmt(s.timescale, 3));
    text("f-io", `${fmt(s.inputs ?? "–")} / ${fmt(s.outputs ?? "–")}`);
    text("f-step", `${fmt(s.step_us_median ?? "–", 0)} / ${fmt(s.step_us_p99 ?? "–", 0)}`);
    text("f-late", `${fmt(s.late_us_median ?? "–", 0)} / ${fmt(s.late_us_p99 ?? "–", 0)}`);
    text("f-learn", s.learn === undefined ? "–" : s.learn + (s.learn === "running" && s.learn_progress !== undefined ? ` ${Math.round(100 * s.learn_progress)}%` : ""));
    syncControl("c-mode", "mode", (v) => v);
    syncControl("c-temperature", "temperature", (v) => v);
    syncControl("c-sigma", "sigma_temperature", (v) => v);
    syncControl("c-timescale", "timescale", (v) => Math.log10(Math.max(1e-3, v)));
    syncControl("c-model", "model", (v) => v);
    const paused = Number(s.paused) === 1;
    $("c-pause").setAttribute("aria-pressed", String(paused));
    $("c-pause").textContent = paused ? "resume" : "pause";
    showOutputs();
  }

  function syncControl(id, key, map) {
    const v = state.status[key];
    if (v === undefined || performance.now() - (state.touched[id] || 0) < TOUCH_HOLD_MS) return;
    const el = $(id);
    const want = String(map(v));
    if (el.tagName === "SELECT" && ![...el.options].some((o) => o.value === want)) return;
    if (el.value !== want) el.value = want;
  }

  function showOutputs() {
    $("o-temperature").textContent = Number($("c-temperature").value).toFixed(2);
    $("o-sigma").textContent = Number($("c-sigma").value).toFixed(2);
    $("o-timescale").textContent = timescaleValue().toPrecision(3);
  }

  const timescaleValue = () => Math.pow(10, Number($("c-timescale").value));

  // The model menu (the folders in models/) and the mode menu (the server's list) come from the monitor.
  function fillSelect(id, names, key) {
    const sel = $(id);
    const current = [...sel.options].map((o) => o.value).join("\n");
    if (current === names.join("\n")) return;
    sel.replaceChildren(...names.map((n) => { const o = document.createElement("option"); o.value = n; o.textContent = n; return o; }));
    syncControl(id, key, (v) => v);
  }

  function throttled(fn, ms) {
    let last = 0, timer = null;
    return () => {
      const wait = last + ms - performance.now();
      if (wait <= 0) { last = performance.now(); fn(); return; }
      if (!timer) timer = setTimeout(() => { timer = null; last = performance.now(); fn(); }, wait);
    };
  }

  function bindControls() {
    const touch = (id) => { state.touched[id] = performance.now(); };
    const slider = (id, address, value) => {
      const sendNow = throttled(() => send(address, [value()]), 100);
      $(id).addEventListener("input", () => { touch(id); showOutputs(); sendNow(); });
      $(id).addEventListener("change", () => { touch(id); send(address, [value()]); });
    };
    slider("c-temperature", "/temperature", () => Number($("c-temperature").value));
    slider("c-sigma", "/sigma_temperature", () => Number($("c-sigma").value));
    slider("c-timescale", "/timescale", timescaleValue);
    $("c-mode").addEventListener("change", () => { touch("c-mode"); send("/mode", [$("c-mode").value]); });
    $("c-model").addEventListener("change", () => { touch("c-model"); send("/model", [$("c-model").value]); });
    $("c-pause").addEventListener("click", () => {
      const paused = $("c-pause").getAttribute("aria-pressed") === "true";
      send("/pause", [paused ? 0 : 1]);
    });
    $("c-reset").addEventListener("click", () => { state.model = {}; state.performer = {}; send("/reset"); });
    $("c-learn").addEventListener("click", () => send("/learn"));
    $("c-stop").addEventListener("click", () => send("/learn/stop"));
    $("controls").addEventListener("submit", (e) => e.preventDefault());
    showOutputs();
  }

  // ------------------------------------------------------------------ mixture maths
  function weightsOf(m) {
    const total = m.weights.reduce((a, b) => a + Math.max(0, b), 0);
    return m.weights.map((w) => (total > 0 ? Math.max(0, w) / total : 1 / m.weights.length));
  }

  // Heat map of the next position: sum of weighted 2D Gaussians on a GRID x GRID image, over the first two values
  // (at N = 1, over the one value, up the plane: the same density in every column).
  const heatCanvas = document.createElement("canvas");
  heatCanvas.width = GRID; heatCanvas.height = GRID;
  const heatCtx = heatCanvas.getContext("2d");
  const heatData = heatCtx.createImageData(GRID, GRID);

  function heatImage(m) {
    const canvas = heatCanvas, ctx = heatCtx, img = heatData;
    const w = weightsOf(m);
    const dens = new Float32Array(GRID * GRID);
    let max = 0;
    for (let row = 0; row < GRID; row++) {
      const y = 1 - (row + 0.5) / GRID;
      for (let col = 0; col < GRID; col++) {
        const x = (col + 0.5) / GRID;
        let d = 0;
        m.components.forEach((c, k) => {
          if (m.dims === 1) { d += w[k] * normal(y, c.means[0], c.sigmas[0]); return; }
          d += w[k] * normal(x, c.means[0], c.sigmas[0]) * normal(y, c.means[1], c.sigmas[1]);
        });
        dens[row * GRID + col] = d;
        if (d > max) max = d;
      }
    }
    for (let i = 0; i < dens.length; i++) {
      const v = max > 0 ? Math.pow(dens[i] / max, 0.4) : 0;
      img.data[4 * i] = 60 + 195 * v;
      img.data[4 * i + 1] = 40 + 60 * v * v;
      img.data[4 * i + 2] = 200 + 55 * v;
      img.data[4 * i + 3] = 230 * v;
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }

  // A normal density over [0, 1], never narrower than a heat map cell: visible even when sharp.
  function normal(v, mean, sigma) {
    const s = Math.max(sigma, 0.75 / GRID), z = (v - mean) / s;
    return Math.exp(-0.5 * z * z) / s;
  }

  // Density of log(dt) under the mixture (each component normal in log time).
  function dtDensity(m, t) {
    const w = weightsOf(m);
    const lt = Math.log(t);
    let d = 0;
    m.components.forEach((c, k) => {
      const s = Math.max(c.dt_sigma, 1e-3);
      const z = (lt - Math.log(Math.max(c.dt, 1e-6))) / s;
      d += w[k] * Math.exp(-0.5 * z * z) / (s * Math.sqrt(2 * Math.PI));
    });
    return d;
  }

  // ------------------------------------------------------------------ drawing
  function scaleCanvas(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(canvas.clientWidth * dpr), h = Math.round(canvas.clientHeight * dpr);
    if (w > 0 && h > 0 && (canvas.width !== w || canvas.height !== h)) { canvas.width = w; canvas.height = h; }
    return [canvas.width, canvas.height];
  }

  // Where an event sits on the plane, in [0, 1]^2: its first two values, or at N = 1 its value against its age
  // (the newest at the right edge, gone at the left as its trail fades).
  function planeXY(p, now) {
    return p.v.length >= 2 ? [p.v[0], p.v[1]] : [1 - (now - p.t) / TRAIL_MS, p.v[0]];
  }

  function drawTrail(ctx, trail, colour, now, size, label) {
    const [w, h] = size;
    const r = Math.max(3, w / 90);
    let last = null;
    for (let i = 0; i < trail.length; i++) {
      const p = trail[i];
      const a = 1 - (now - p.t) / TRAIL_MS;
      const [x, y] = planeXY(p, now);
      const px = x * w, py = (1 - y) * h;
      if (a <= 0) { last = [px, py]; continue; }
      if (last) {
        ctx.globalAlpha = a * 0.6;
        ctx.strokeStyle = colour; ctx.lineWidth = r / 2;
        ctx.beginPath(); ctx.moveTo(last[0], last[1]); ctx.lineTo(px, py); ctx.stroke();
      }
      last = [px, py];
      ctx.globalAlpha = a;
      ctx.fillStyle = colour;
      ctx.beginPath(); ctx.arc(px, py, i === trail.length - 1 ? r * 1.8 : r, 0, 2 * Math.PI); ctx.fill();
    }
    const newest = trail[trail.length - 1];
    if (label && newest && now - newest.t < TRAIL_MS) {  // the voice's number beside its newest point
      ctx.globalAlpha = 1 - (now - newest.t) / TRAIL_MS;
      ctx.fillStyle = colour;
      ctx.font = `${Math.round(r * 3)}px system-ui, sans-serif`;
      ctx.fillText(label, last[0] + r * 2.2, last[1] - r * 2.2);
    }
    ctx.globalAlpha = 1;
    while (trail.length && now - trail[0].t > TRAIL_MS) trail.shift();
  }

  // The plane's background (black, the heat map scaled up, the grid) is drawn once per heat map or resize,
  // not once per frame: scaling an image is the costliest thing on the page where canvas runs in software.
  const background = document.createElement("canvas");
  let backgroundFor = null;
  let colours = null;

  function planeBackground(w, h) {
    if (backgroundFor === state.heat && background.width === w && background.height === h) return background;
    background.width = w; background.height = h;
    const ctx = background.getContext("2d");
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, w, h);
    if (state.heat) { ctx.imageSmoothingEnabled = true; ctx.drawImage(state.heat, 0, 0, w, h); }
    ctx.strokeStyle = "#1d232a"; ctx.lineWidth = 1;
    for (let i = 1; i < 4; i++) {
      ctx.beginPath(); ctx.moveTo((i * w) / 4, 0); ctx.lineTo((i * w) / 4, h); ctx.stroke();
      ctx.beginPath(); ctx.moveTo(0, (i * h) / 4); ctx.lineTo(w, (i * h) / 4); ctx.stroke();
    }
    backgroundFor = state.heat;
    return background;
  }

  function drawPlane(now) {
    const canvas = $("plane");
    const size = scaleCanvas(canvas);
    const [w, h] = size;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(planeBackground(w, h), 0, 0);
    if (!colours) {
      const css = getComputedStyle(document.documentElement);
      colours = { performer: css.getPropertyValue("--performer").trim(), model: css.getPropertyValue("--model").trim() };
    }
    drawTrails(ctx, state.performer, colours.performer, now, size);
    drawTrails(ctx, state.model, colours.model, now, size);
    if (!anyTrail(state.model) && !anyTrail(state.performer) && !state.mixture) drawHint(ctx, w, h);
    else delete canvas.dataset.hint;
  }

  // An empty plane says why it is empty and what to do, rather than leaving a page of dashes.
  function hintText() {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return ["the monitor process does not answer", "is `antiphon monitor` (or run --monitor) still running?"];
    if (!serverSeen || performance.now() - serverSeen > 3000) {
      const where = $("server").textContent.replace(/^server /, "") || "its OSC port";
      return [`waiting for the server at ${where}`, "start it with `make run` (or pass --server HOST:PORT)"];
    }
    return ["the server is live: nothing played yet", "play a gesture, or choose mode generate below"];
  }

  function drawHint(ctx, w, h) {
    const [first, second] = hintText();
    ctx.save();
    ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--text").trim() || "#ccc";
    ctx.textAlign = "center";
    ctx.font = `${Math.max(12, Math.round(w / 32))}px sans-serif`;
    ctx.fillText(first, w / 2, h / 2 - 10);
    ctx.globalAlpha = 0.7;
    ctx.font = `${Math.max(10, Math.round(w / 44))}px sans-serif`;
    ctx.fillText(second, w / 2, h / 2 + 16);
    ctx.restore();
    $("plane").dataset.hint = first;  // what the plane says, for tests and screen readers
    $("plane").setAttribute("aria-description", `${first}: ${second}`);
  }


  // The newest event of any voice in `trails` that has a value at index `d`.
  function newest(trails, d) {
    let best = null;
    for (const key of Object.keys(trails)) {
      const p = trails[key][trails[key].length - 1];
      if (p && p.v.length > d && (!best || p.t > best.t)) best = p;
    }
    return best;
  }

  // Values 3..N as bars beside the plane, 0 at the bottom and 1 at the top like the plane's y: each column's
  // background is that value's predicted density (the heat map's colours), the performer's newest value fills its
  // left half (cyan), the model's its right half (amber), fading as the trails do.
  function drawBars(now) {
    const canvas = $("bars");
    if (canvas.hidden) return;
    const planeHeight = $("plane").clientHeight;
    if (planeHeight > 0 && canvas.style.height !== `${planeHeight}px`) canvas.style.height = `${planeHeight}px`;
    const [w, h] = scaleCanvas(canvas);
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, w, h);
    const count = state.dims - 2, cw = w / count, gap = Math.max(2, cw * 0.12);
    const label = Math.max(10, Math.round(cw * 0.38)), top = label * 1.6;
    const m = state.mixture, weights = m ? weightsOf(m) : null, rows = GRID;
    for (let i = 0; i < count; i++) {
      const d = i + 2, x0 = i * cw + gap / 2, bw = cw - gap, plot = h - top;
      if (m) {
        const dens = [];
        for (let r = 0; r < rows; r++) {
          const v = 1 - (r + 0.5) / rows;
          dens.push(m.components.reduce((a, c, k) => a + weights[k] * normal(v, c.means[d], c.sigmas[d]), 0));
        }
        const max = Math.max(...dens);
        dens.forEach((v, r) => {  // whole pixels, edge to edge: rows that overlap would show as stripes
          const y0 = Math.round(top + (r * plot) / rows), y1 = Math.round(top + ((r + 1) * plot) / rows);
          ctx.fillStyle = `rgba(125, 92, 255, ${max > 0 ? 0.9 * Math.pow(v / max, 0.4) : 0})`;
          ctx.fillRect(x0, y0, bw, y1 - y0);
        });
      }
      [["performer", 0], ["model", 1]].forEach(([who, half]) => {
        const p = newest(state[who], d);
        const a = p ? 1 - (now - p.t) / TRAIL_MS : 0;
        if (a <= 0) return;
        const v = Math.min(1, Math.max(0, p.v[d]));
        ctx.globalAlpha = a;
        ctx.fillStyle = colours[who];
        ctx.fillRect(x0 + (half * bw) / 2 + 1, top + (1 - v) * plot, bw / 2 - 2, v * plot);
        ctx.globalAlpha = 1;
      });
      ctx.fillStyle = "#8a949e"; ctx.font = `${label}px system-ui`; ctx.textAlign = "center";
      ctx.fillText(`v${d + 1}`, x0 + bw / 2, label * 1.1);
    }
  }

  function drawDt() {
    const canvas = $("dt");
    const [w, h] = scaleCanvas(canvas);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    const pad = 22 * (window.devicePixelRatio || 1);
    ctx.fillStyle = "#8a949e"; ctx.font = `${Math.round(pad * 0.55)}px system-ui`;
    const lmin = Math.log(DT_MIN), lmax = Math.log(DT_MAX);
    const xOf = (t) => ((Math.log(t) - lmin) / (lmax - lmin)) * w;
    [0.001, 0.01, 0.1, 1, 10].forEach((t) => {
      const x = xOf(t);
      ctx.fillRect(x, h - pad, 1, 4);
      const label = t < 1 ? `${t * 1000} ms` : `${t} s`;
      ctx.textAlign = t === 0.001 ? "left" : t === 10 ? "right" : "center";
      ctx.fillText(label, x, h - 4);
    });
    if (!state.mixture) return;
    const n = 200, ys = [];
    let max = 0;
    for (let i = 0; i <= n; i++) {
      const t = Math.exp(lmin + ((lmax - lmin) * i) / n);
      const d = dtDensity(state.mixture, t);
      ys.push(d); if (d > max) max = d;
    }
    const plotH = h - pad - 4;
    ctx.beginPath(); ctx.moveTo(0, plotH);
    ys.forEach((d, i) => ctx.lineTo((w * i) / n, plotH - (max > 0 ? (d / max) * (plotH - 4) : 0)));
    ctx.lineTo(w, plotH); ctx.closePath();
    ctx.fillStyle = "rgba(125, 92, 255, 0.45)"; ctx.fill();
    ctx.strokeStyle = "#7d5cff"; ctx.lineWidth = 2; ctx.stroke();
  }

  function drawSurprise(now) {
    const canvas = $("surprise");
    const [w, h] = scaleCanvas(canvas);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, w, h);
    const pts = state.surprise;
    while (pts.length && now - pts[0].t > SURPRISE_MS) pts.shift();
    if (!pts.length) return;
    let lo = Infinity, hi = -Infinity;
    pts.forEach((p) => { lo = Math.min(lo, p.nll, p.smoothed); hi = Math.max(hi, p.nll, p.smoothed); });
    if (hi - lo < 1) { hi += 0.5; lo -= 0.5; }
    const xOf = (t) => w - ((now - t) / SURPRISE_MS) * w;
    const yOf = (v) => h - 6 - ((v - lo) / (hi - lo)) * (h - 12);
    const line = (key, colour, width) => {
      ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(xOf(p.t), yOf(p[key])) : ctx.moveTo(xOf(p.t), yOf(p[key]))));
      ctx.strokeStyle = colour; ctx.lineWidth = width; ctx.stroke();
    };
    line("nll", "rgba(56, 208, 255, 0.45)", 1);
    line("smoothed", "#38d0ff", 3);
    ctx.fillStyle = "#8a949e"; ctx.font = `${Math.round(h / 10)}px system-ui`;
    ctx.textAlign = "left"; ctx.fillText(hi.toFixed(1), 4, h / 10 + 2); ctx.fillText(lo.toFixed(1), 4, h - 4);
  }

  function frame(now) {
    requestAnimationFrame(frame);
    if (now - state.lastFrame < FRAME_MS) return;
    const trails = anyTrail(state.model) || anyTrail(state.performer);
    // Only the surprise history scrolling (30 s across the chart): a few frames a second are enough.
    if (!state.dirty && !trails && (!state.surprise.length || now - state.lastFrame < SLOW_FRAME_MS)) return;
    state.lastFrame = now;
    state.dirty = false;
    if (state.heatStale && state.mixture && now - (state.lastHeat || 0) >= HEAT_MS) {
      state.heat = heatImage(state.mixture);
      backgroundFor = null;
      drawDt();
      state.heatStale = false;
      state.lastHeat = now;
    }
    drawPlane(now);
    drawBars(now);
    drawSurprise(now);
  }

  function checkLink() {
    const was = $("link").textContent;
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) setLink(false, "monitor");
    else if (!serverSeen || performance.now() - serverSeen > 3000) setLink(false, "server");
    else setLink(true);
    if ($("link").textContent !== was) state.dirty = true;  // the empty plane's hint follows the link
  }

  window.addEventListener("resize", () => { state.dirty = true; drawDt(); });
  bindControls();
  drawDt();
  connect();
  requestAnimationFrame(frame);
  setInterval(checkLink, 500);
  // Read-only: which voices have a trail on the plane now (for tests, and for the curious in the console).
  window.antiphonVoices = () => ({ model: Object.keys(state.model), performer: Object.keys(state.performer) });
  // Read-only: the playing model's width and how many bars beside the plane show the values past the first two.
  window.antiphonDims = () => ({ dims: state.dims, bars: $("bars").hidden ? 0 : state.dims - 2 });
})();
