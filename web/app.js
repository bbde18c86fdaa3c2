// herald's test page: N socket.io clients in one tab, spread round robin over instance URLs.
// Each card shows who the client is, where it is connected, and whether the latest test event
// reached it (offset, latency), missed it, or recovered it after a reconnect.
"use strict";

(() => {
  const MISS_AFTER_MS = 2000;
  const STATS_POINTS = 60;
  const NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj"];

  const $ = (selector) => document.querySelector(selector);
  const ui = {
    mode: $("#mode"),
    tokens: $("#tokens"),
    mint: $("#mint"),
    mintHint: $("#mint-hint"),
    urls: $("#urls"),
    count: $("#count"),
    transports: $("#transports"),
    connectAll: $("#connect-all"),
    disconnectAll: $("#disconnect-all"),
    room: $("#room"),
    joinAll: $("#join-all"),
    sender: $("#sender"),
    send: $("#send"),
    sendResult: $("#send-result"),
    clients: $("#clients"),
    presence: $("#presence"),
    presenceRoom: $("#presence-room"),
    loadHistory: $("#load-history"),
    historyHint: $("#history-hint"),
    history: $("#history"),
    log: $("#log"),
    stats: $("#stats"),
    cardTemplate: $("#card-template"),
  };

  /** @type {Client[]} */
  let clients = [];
  /** The latest test event: {id, n, room, from, t0, timer}. */
  let probe = null;
  let probeCount = 0;

  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const clock = (date = new Date()) => date.toTimeString().slice(0, 8) + "." + String(date.getMilliseconds()).padStart(3, "0");
  const fmtMs = (ms) => (ms < 10 ? `${ms.toFixed(1)} ms` : ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`);
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const room = () => ui.room.value.trim();
  const lines = (text) => text.split("\n").map((l) => l.trim()).filter(Boolean);

  function log(text, bad = false) {
    const item = el("li", bad ? "bad" : "");
    item.append(el("span", "meta", clock()), text);
    ui.log.prepend(item);
    while (ui.log.children.length > 200) ui.log.lastChild.remove();
  }

  function instanceUrls() {
    const urls = [];
    for (const line of lines(ui.urls.value)) {
      try {
        urls.push(new URL(line).origin);
      } catch {
        log(`not a URL, skipped: ${line}`, true);
      }
    }
    return urls.length ? [...new Set(urls)] : [location.origin];
  }

  // ---- one socket.io client and its card ---------------------------------------------------

  class Client {
    constructor(index, url, token) {
      this.index = index;
      this.name = `client ${index + 1}`;
      this.url = url;
      this.user = null;
      this.instance = null;
      this.transport = null;
      this.state = "connecting";
      this.stateText = "connecting";
      /** Rooms this client belongs in: joined again, with `since`, on every (re)connect. */
      this.rooms = new Set();
      /** Rooms joined on the current connection. */
      this.joined = new Set();
      /** room -> the last offset seen, the `since` of the next join. */
      this.offsets = new Map();
      /** room -> {since, count}: joins waiting for their ack, counting re-sent messages. */
      this.joining = new Map();
      this.received = 0;
      this.delivery = { kind: "idle" };
      this.recovery = { text: "", bad: false };
      this.card = ui.cardTemplate.content.firstElementChild.cloneNode(true);
      this.card.dataset.client = String(index + 1);
      this.card.querySelector('[data-role="name"]').textContent = `Client ${index + 1}`;
      this.card.querySelector('[data-action="join"]').onclick = () => this.join(room());
      this.card.querySelector('[data-action="send"]').onclick = () => sendTest(this);
      this.card.querySelector('[data-action="toggle"]').onclick = () => this.toggle();
      // forceNew: one Engine.IO connection per client, as separate browsers would have.
      this.socket = io(url, {
        forceNew: true,
        transports: ui.transports.value.split(","),
        auth: token ? { token } : {},
        reconnectionDelayMax: 3000,
      });
      this.wire();
      this.render();
    }

    wire() {
      const socket = this.socket;
      socket.io.on("open", () => {
        const engine = socket.io.engine;
        this.setTransport(engine.transport.name);
        engine.on("upgrade", (transport) => {
          this.setTransport(transport.name);
          log(`${this.name} upgraded to ${transport.name}`);
        });
      });
      socket.io.on("reconnect_attempt", (attempt) => this.setState("reconnecting", `reconnecting (${attempt})`));
      socket.on("connect", () => {
        this.setState("connected");
        log(`${this.name} connected to ${this.url}`);
        for (const name of this.rooms) this.join(name);
      });
      socket.on("session", (session) => {
        this.user = session.user;
        this.instance = session.instance;
        this.render();
        refreshSenders();
      });
      socket.on("connect_error", (error) => {
        if (socket.active) {
          this.setState("reconnecting", "reconnecting");
        } else {
          this.setState("refused", `refused: ${error.message}`);
          log(`${this.name} was refused: ${error.message}${error.message === "unauthorized" ? " (mint or paste a valid token)" : ""}`, true);
        }
      });
      socket.on("disconnect", (reason) => {
        this.joined.clear();
        this.joining.clear();
        this.setTransport(null);
        if (reason === "io client disconnect") {
          this.setState("disconnected");
        } else {
          this.setState("reconnecting", "reconnecting");
        }
        log(`${this.name} disconnected (${reason})`, reason !== "io client disconnect");
        updateViewer();
      });
      socket.on("message", (message) => this.onMessage(message));
      socket.on("presence", (change) => onPresence(this, change));
    }

    setState(state, text = state) {
      this.state = state;
      this.stateText = text;
      this.render();
      refreshSenders();
    }

    setTransport(name) {
      this.transport = name;
      this.render();
    }

    toggle() {
      if (this.socket.connected || this.socket.active) {
        this.socket.disconnect();
      } else {
        this.setState("connecting");
        this.socket.connect();
      }
    }

    /** Joins `name`, from the last offset seen when there is one: what was missed comes first. */
    join(name) {
      if (!name) return;
      this.rooms.add(name);
      this.render();
      if (!this.socket.connected || this.joined.has(name) || this.joining.has(name)) return;
      const since = this.offsets.get(name);
      const pending = { since, count: 0 };
      this.joining.set(name, pending);
      this.socket.emit("join", since === undefined ? name : { room: name, since }, (ack) => {
        if (this.joining.get(name) !== pending) return; // disconnected meanwhile
        this.joining.delete(name);
        if (!ack || !ack.ok) {
          this.rooms.delete(name);
          log(`${this.name} could not join ${name}: ${ack ? `${ack.error}: ${ack.message}` : "no answer"}`, true);
          this.render();
          return;
        }
        this.joined.add(name);
        this.offsets.set(name, Math.max(this.offsets.get(name) ?? 0, ack.offset ?? 0));
        if (since !== undefined) {
          if (ack.recovered === false) {
            this.recovery = { text: `could not recover ${name} after #${since}: load its history`, bad: true };
          } else if (pending.count > 0) {
            this.recovery = { text: `recovered ${plural(pending.count, "missed message")} in ${name}`, bad: false };
          } else {
            this.recovery = { text: `rejoined ${name}: nothing missed`, bad: false };
          }
          log(`${this.name} ${this.recovery.text}`, this.recovery.bad);
        } else {
          log(`${this.name} joined ${name} at offset ${ack.offset}`);
        }
        this.render();
        updateViewer();
      });
    }

    onMessage(message) {
      this.received += 1;
      if (message.offset > (this.offsets.get(message.room) ?? 0)) this.offsets.set(message.room, message.offset);
      const pending = this.joining.get(message.room);
      const recovered = pending !== undefined && pending.since !== undefined && message.offset > pending.since;
      if (recovered) pending.count += 1;
      const data = message.data;
      if (probe && data && typeof data === "object" && data.probe === probe.id) {
        const latency = performance.now() - probe.t0;
        const late = recovered || this.delivery.kind === "missed";
        this.delivery = { kind: late ? "late" : "ok", offset: message.offset, latency, from: message.from, recovered };
        this.flash();
      }
      this.render();
    }

    flash() {
      this.card.classList.remove("flash");
      void this.card.offsetWidth; // restart the animation
      this.card.classList.add("flash");
    }

    render() {
      const card = this.card;
      const field = (role) => card.querySelector(`[data-role="${role}"]`);
      card.dataset.state = this.state;
      field("state").textContent = this.stateText;
      field("user").textContent = this.user ?? "–";
      field("instance").textContent = this.instance ?? "–";
      field("instance").title = this.url;
      field("transport").textContent = this.transport ?? "–";
      field("rooms").textContent = this.rooms.size
        ? [...this.rooms].map((r) => (this.offsets.has(r) ? `${r} #${this.offsets.get(r)}` : `${r} …`)).join(", ")
        : "–";
      field("received").textContent = plural(this.received, "message");

      const d = this.delivery;
      card.dataset.delivery = d.kind;
      const main = field("delivery-main");
      const detail = field("delivery-detail");
      delete main.dataset.offset;
      delete main.dataset.latency;
      switch (d.kind) {
        case "idle":
          main.textContent = "no test event yet";
          detail.textContent = "";
          break;
        case "absent":
          main.textContent = `not in ${d.room}`;
          detail.textContent = "join the room to receive its messages";
          break;
        case "pending":
          main.textContent = "waiting…";
          detail.textContent = `test event ${d.n} sent to ${d.room}`;
          break;
        case "missed":
          main.textContent = "missed";
          detail.textContent = `test event ${d.n} did not arrive within ${MISS_AFTER_MS / 1000} s`;
          break;
        case "ok":
        case "late":
          main.dataset.offset = String(d.offset);
          main.dataset.latency = String(d.latency);
          main.textContent = d.kind === "ok" ? `#${d.offset} in ${fmtMs(d.latency)}` : `#${d.offset} recovered`;
          detail.textContent =
            d.kind === "ok"
              ? `offset ${d.offset} · latency ${fmtMs(d.latency)} · from ${d.from}`
              : `offset ${d.offset} · arrived ${fmtMs(d.latency)} after it was sent${d.recovered ? ", on rejoin" : ""}`;
          break;
      }
      const recovery = field("recovery");
      recovery.textContent = this.recovery.text;
      recovery.classList.toggle("bad", this.recovery.bad);

      const live = this.socket && (this.socket.connected || this.socket.active);
      card.querySelector('[data-action="toggle"]').textContent = live ? "Disconnect" : "Reconnect";
      card.querySelector('[data-action="send"]').disabled = !this.socket?.connected;
      card.classList.toggle("sender", probe !== null && probe.from === this);
    }

    close() {
      this.socket.removeAllListeners();
      this.socket.io.removeAllListeners();
      this.socket.disconnect();
    }
  }

  // ---- connecting --------------------------------------------------------------------------

  function clientCount() {
    const n = Number.parseInt(ui.count.value, 10);
    return Number.isFinite(n) ? Math.min(Math.max(n, 1), 12) : 3;
  }

  function connectAll() {
    for (const c of clients) c.close();
    const urls = instanceUrls();
    const tokens = lines(ui.tokens.value);
    if (!tokens.length) log("no token: herald refuses clients without one unless HERALD_AUTH=off", true);
    clients = Array.from({ length: clientCount() }, (_, i) => new Client(i, urls[i % urls.length], tokens[i % tokens.length]));
    ui.clients.replaceChildren(...clients.map((c) => c.card));
    probe = null;
    refreshSenders();
    syncStats(urls);
    updateViewer(true);
    log(`connecting ${plural(clients.length, "client")} to ${urls.join(", ")}`);
  }

  function refreshSenders() {
    const selected = ui.sender.value;
    ui.sender.replaceChildren(
      ...clients.map((c) => {
        const option = el("option", "", `${c.name}${c.user ? ` · ${c.user}` : ""}${c.socket.connected ? "" : " (offline)"}`);
        option.value = String(c.index);
        return option;
      }),
    );
    if (selected && selected < clients.length) ui.sender.value = selected;
  }

  async function mintTokens() {
    const names = Array.from({ length: clientCount() }, (_, i) => NAMES[i] ?? `user-${i + 1}`);
    ui.mint.disabled = true;
    ui.mintHint.classList.remove("bad");
    try {
      const tokens = [];
      for (const sub of names) {
        const response = await fetch("/dev/token", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ sub }),
        });
        const body = await response.json().catch(() => ({}));
        if (!response.ok || !body.token) throw new Error(body.message ?? `HTTP ${response.status}`);
        tokens.push(body.token);
      }
      ui.tokens.value = tokens.join("\n");
      ui.mintHint.textContent = `${plural(tokens.length, "token")} for ${names.join(", ")}, valid 1 h`;
      log(`minted dev tokens for ${names.join(", ")}`);
    } catch (error) {
      ui.mintHint.textContent = `could not mint: ${error.message}`;
      ui.mintHint.classList.add("bad");
    } finally {
      ui.mint.disabled = false;
    }
  }

  // ---- test events -------------------------------------------------------------------------

  function sendTest(from) {
    const name = room();
    ui.sendResult.classList.remove("bad");
    const fail = (text) => {
      ui.sendResult.textContent = text;
      ui.sendResult.classList.add("bad");
    };
    if (!from) return fail("connect some clients first");
    if (!name) return fail("name a room first");
    if (!from.socket.connected) return fail(`${from.name} is not connected`);
    if (!from.joined.has(name)) return fail(`${from.name} has not joined ${name}: join first`);

    if (probe) clearTimeout(probe.timer);
    probeCount += 1;
    const id = `${Date.now().toString(36)}-${probeCount}`;
    probe = { id, n: probeCount, room: name, from, t0: performance.now(), timer: 0 };
    for (const c of clients) {
      c.delivery = c.rooms.has(name) ? { kind: "pending", n: probeCount, room: name } : { kind: "absent", room: name };
      c.render();
    }
    const current = probe;
    const data = { text: `test event ${probeCount} from ${from.name}`, probe: id, sentAt: Date.now() };
    from.socket.emit("message", { room: name, data }, (ack) => {
      if (ack && ack.ok) {
        log(`${from.name} published test event ${current.n} to ${name} at offset ${ack.offset}`);
      } else {
        fail(`not published: ${ack ? `${ack.error}: ${ack.message}` : "no answer"}`);
      }
    });
    ui.sendResult.textContent = `test event ${probeCount} sent by ${from.name}…`;
    probe.timer = setTimeout(() => settle(current), MISS_AFTER_MS);
  }

  /** After the deadline: every member that has not received the test event missed it. */
  function settle(settled) {
    if (probe !== settled) return;
    const expected = clients.filter((c) => c.delivery.kind !== "absent");
    for (const c of expected) {
      if (c.delivery.kind === "pending") {
        c.delivery = { kind: "missed", n: settled.n, room: settled.room };
        c.render();
      }
    }
    const got = expected.filter((c) => c.delivery.kind === "ok");
    const missed = expected.filter((c) => c.delivery.kind === "missed");
    const latencies = got.map((c) => c.delivery.latency);
    let text = `test event ${settled.n}: ${got.length} of ${expected.length} clients received it`;
    if (latencies.length) text += `, in ${fmtMs(Math.min(...latencies))} to ${fmtMs(Math.max(...latencies))}`;
    if (missed.length) text += `; missed by ${missed.map((c) => c.name).join(", ")}`;
    ui.sendResult.textContent = text;
    ui.sendResult.classList.toggle("bad", missed.length > 0);
    log(text, missed.length > 0);
  }

  // ---- presence and history ----------------------------------------------------------------

  /** The client whose view of the room the presence panel shows. */
  let viewer = null;
  /** user -> "online" | "left" */
  let presence = new Map();

  function updateViewer(force = false) {
    const name = room();
    const next = clients.find((c) => c.socket.connected && c.joined.has(name)) ?? null;
    if (next === viewer && !force) return;
    viewer = next;
    presence = new Map();
    ui.presenceRoom.textContent = name ? `in ${name}${next ? `, as ${next.name} sees it` : ""}` : "";
    renderPresence();
    if (!next) return;
    next.socket.emit("presence", name, (ack) => {
      if (viewer !== next || !ack || !ack.ok) return;
      presence = new Map(ack.users.map((user) => [user, "online"]));
      renderPresence();
    });
  }

  function onPresence(client, change) {
    if (client !== viewer || change.room !== room()) return;
    if (change.status === "join") {
      presence.set(change.user, "online");
    } else {
      presence.set(change.user, "left");
      setTimeout(() => {
        if (presence.get(change.user) === "left") {
          presence.delete(change.user);
          renderPresence();
        }
      }, 5000);
    }
    log(`presence: ${change.user} ${change.status === "join" ? "joined" : "left"} ${change.room}`);
    renderPresence();
  }

  function renderPresence() {
    if (!presence.size) {
      ui.presence.replaceChildren(el("li", "none", viewer ? "nobody" : "join the room with a client to see who is in it"));
      return;
    }
    const users = [...presence.entries()].sort(([a], [b]) => a.localeCompare(b));
    ui.presence.replaceChildren(...users.map(([user, status]) => el("li", status === "left" ? "left" : "", user)));
  }

  function loadHistory() {
    const name = room();
    const from = viewer ?? clients.find((c) => c.socket.connected);
    ui.historyHint.classList.remove("bad");
    if (!from || !name) {
      ui.historyHint.textContent = "connect a client first";
      ui.historyHint.classList.add("bad");
      return;
    }
    from.socket.emit("history", { room: name, limit: 50 }, (ack) => {
      if (!ack || !ack.ok) {
        ui.historyHint.textContent = `history refused: ${ack ? ack.error : "no answer"}`;
        ui.historyHint.classList.add("bad");
        return;
      }
      ui.historyHint.textContent = `last ${plural(ack.messages.length, "message")} of ${name} (room offset ${ack.offset})`;
      ui.history.replaceChildren(
        ...ack.messages
          .slice()
          .reverse()
          .map((m) => {
            const item = el("li");
            const text = m.data && typeof m.data === "object" && "text" in m.data ? String(m.data.text) : JSON.stringify(m.data);
            item.append(el("span", "meta", `#${m.offset} ${clock(new Date(m.ts))}`), el("b", "", m.from), `: ${text}`);
            return item;
          }),
      );
    });
  }

  // ---- instance stats ----------------------------------------------------------------------

  /** url -> {url, root, canvas, numbers, title, points: [{t, published, delivered, connections}]} */
  const instances = new Map();

  function syncStats(urls) {
    for (const [url, inst] of instances) {
      if (!urls.includes(url)) {
        inst.root.remove();
        instances.delete(url);
      }
    }
    for (const url of urls) {
      if (instances.has(url)) continue;
      const root = el("div", "instance-stat");
      const title = el("div", "title", url);
      const numbers = el("div", "numbers", "…");
      const canvas = el("canvas");
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `messages per second on ${url}`);
      const legend = el("div", "legend");
      legend.append(el("span", "delivered", "delivered/s"), el("span", "published", "published/s"));
      root.append(title, numbers, canvas, legend);
      ui.stats.append(root);
      instances.set(url, { url, root, title, numbers, canvas, points: [] });
    }
  }

  async function pollStats() {
    if (document.hidden) return;
    await Promise.all([...instances.values()].map(pollOne));
  }

  async function pollOne(inst) {
    try {
      const response = await fetch(`${inst.url}/stats.json`, { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const s = await response.json();
      inst.points.push({ t: performance.now(), published: s.published, delivered: s.delivered });
      if (inst.points.length > STATS_POINTS + 1) inst.points.shift();
      const rates = ratesOf(inst.points);
      const last = rates.at(-1) ?? { published: 0, delivered: 0 };
      inst.root.classList.remove("down");
      inst.title.textContent = `${s.instance} · ${inst.url}`;
      inst.numbers.replaceChildren(
        stat(s.connections, "connections"),
        stat(Math.round(last.delivered), "delivered/s"),
        stat(Math.round(last.published), "published/s"),
        stat(uptime(s.uptime_seconds), "up"),
      );
      drawChart(inst.canvas, rates);
    } catch (error) {
      inst.root.classList.add("down");
      inst.title.textContent = `${inst.url}: unreachable (${error.message})`;
    }
  }

  function stat(value, label) {
    const span = el("span");
    span.append(el("b", "", String(value)), ` ${label}`);
    return span;
  }

  function uptime(seconds) {
    if (seconds < 120) return `${seconds}s`;
    if (seconds < 7200) return `${Math.floor(seconds / 60)}m`;
    return `${Math.floor(seconds / 3600)}h`;
  }

  function ratesOf(points) {
    const rates = [];
    for (let i = 1; i < points.length; i++) {
      const [a, b] = [points[i - 1], points[i]];
      const dt = Math.max((b.t - a.t) / 1000, 0.001);
      rates.push({
        published: Math.max(b.published - a.published, 0) / dt,
        delivered: Math.max(b.delivered - a.delivered, 0) / dt,
      });
    }
    return rates;
  }

  function niceMax(value) {
    const steps = [1, 2, 5, 10];
    const scale = 10 ** Math.floor(Math.log10(Math.max(value, 1)));
    return scale * steps.find((s) => s * scale >= value);
  }

  function drawChart(canvas, rates) {
    const ratio = window.devicePixelRatio || 1;
    const [w, h] = [canvas.clientWidth, canvas.clientHeight];
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    const max = niceMax(Math.max(1, ...rates.map((r) => Math.max(r.published, r.delivered))));
    const [top, bottom] = [14, h - 4];
    const y = (v) => bottom - (v / max) * (bottom - top);
    const x = (i) => w - (rates.length - 1 - i) * (w / (STATS_POINTS - 1));

    ctx.strokeStyle = color("--line");
    ctx.lineWidth = 1;
    ctx.fillStyle = color("--muted");
    ctx.font = "10px system-ui, sans-serif";
    for (const v of [max, max / 2]) {
      ctx.beginPath();
      ctx.moveTo(0, Math.round(y(v)) + 0.5);
      ctx.lineTo(w, Math.round(y(v)) + 0.5);
      ctx.stroke();
    }
    ctx.fillText(`${max}/s`, 4, 11);

    const line = (key, stroke, fill) => {
      if (!rates.length) return;
      ctx.beginPath();
      rates.forEach((r, i) => (i ? ctx.lineTo(x(i), y(r[key])) : ctx.moveTo(x(i), y(r[key]))));
      ctx.strokeStyle = stroke;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.stroke();
      if (fill) {
        ctx.lineTo(x(rates.length - 1), bottom);
        ctx.lineTo(x(0), bottom);
        ctx.closePath();
        ctx.globalAlpha = 0.12;
        ctx.fillStyle = stroke;
        ctx.fill();
        ctx.globalAlpha = 1;
      }
    };
    line("published", color("--chart-2"), false);
    line("delivered", color("--accent"), true);
  }

  // ---- start -------------------------------------------------------------------------------

  async function detectDevMode() {
    try {
      const response = await fetch("/stats.json", { cache: "no-store" });
      const s = await response.json();
      if (s.dev_mode) {
        ui.mode.hidden = false;
        ui.mode.title = "no JWT_SECRET is set: tokens are signed with the generated development secret";
        ui.mint.hidden = false;
        ui.mintHint.textContent = "dev mode: mint one token per client here";
      } else {
        ui.mintHint.textContent = "mint a token with: herald token --sub alice";
      }
    } catch (error) {
      ui.mintHint.textContent = `cannot reach /stats.json: ${error.message}`;
    }
  }

  ui.urls.value = location.origin;
  ui.mint.onclick = mintTokens;
  ui.connectAll.onclick = connectAll;
  ui.disconnectAll.onclick = () => clients.forEach((c) => c.socket.disconnect());
  ui.joinAll.onclick = () => clients.forEach((c) => c.join(room()));
  ui.send.onclick = () => sendTest(clients[Number(ui.sender.value)]);
  ui.loadHistory.onclick = loadHistory;
  ui.room.onchange = () => updateViewer(true);
  ui.urls.onchange = () => syncStats(instanceUrls());
  ui.room.onkeydown = (event) => {
    if (event.key === "Enter") ui.joinAll.click();
  };

  if (typeof io !== "function") {
    log("socket.io-client did not load from /assets/socket.io.min.js", true);
    return;
  }
  renderPresence();
  syncStats(instanceUrls());
  detectDevMode();
  pollStats();
  setInterval(pollStats, 1000);
})();
