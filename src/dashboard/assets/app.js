// presenced dashboard: who is online in an account, live, over the Phoenix socket.
import { Socket, Presence } from "/assets/vendor/phoenix.mjs";
import uPlot from "/assets/vendor/uPlot.esm.js";
import { Session, ApiError } from "/assets/api.js";
import { $, el, clear, statusClass, clock, since, fmt, toast, VirtualList } from "/assets/dom.js";

const ROW_HEIGHT = 52;
const FEED_MAX = 150;
const ROOMS_SHOWN = 200;
const LIVE_POINT_MS = 5000;

const session = new Session((why) => showLogin(why));

const state = {
  socket: null,
  channel: null,
  presence: null,
  accountId: null,
  account: null,
  role: null,
  /** Derived on each render from the presence. */
  users: [],
  rooms: new Map(),
  /** user → rooms, from the account's `rooms_state` and `rooms` events. */
  roomsByUser: new Map(),
  /** The open user's connections as where-now reports them (with session ids), or null. */
  userSessions: null,
  userRefs: "",
  userLastSeen: null,
  connections: 0,
  filters: { q: "", status: "", room: "" },
  roomSort: "users",
  openRoom: null,
  openUser: null,
  dirty: false,
  frame: 0,
  chart: null,
  chartData: [[], [], []],
  rangeMs: 3_600_000,
  lastPoint: 0,
  pointTimer: null,
  joinedOnce: false,
  generation: 0,
};

// ---------- login ----------

function showLogin(message) {
  teardown();
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-password").value = "";
  $("login-email").focus();
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const button = $("login-submit");
  button.disabled = true;
  $("login-error").textContent = "";
  try {
    await session.login($("login-email").value.trim(), $("login-password").value);
    await showApp();
  } catch (err) {
    const msg =
      err instanceof ApiError && err.status === 429
        ? "Too many attempts; wait a minute and try again."
        : err instanceof ApiError && err.status === 401
          ? "Wrong email or password."
          : "Cannot reach the server.";
    $("login-error").textContent = msg;
  } finally {
    button.disabled = false;
  }
});

$("logout").addEventListener("click", async () => {
  await session.logout();
  showLogin("");
});

// ---------- app shell ----------

async function showApp() {
  const user = session.user;
  $("login").hidden = true;
  $("app").hidden = false;
  $("me-email").textContent = user.email;
  $("me-role").textContent = user.role;
  state.role = user.role;
  connectSocket();
  const select = $("account-select");
  if (user.role === "admin") {
    const { accounts } = await session.api("GET", "/accounts");
    clear(select);
    for (const a of accounts) select.append(el("option", { value: a.id, text: `${a.name} (${a.plan})` }));
    select.hidden = false;
    $("account-name").hidden = true;
    if (accounts.length === 0) {
      $("account-name").hidden = false;
      $("account-name").textContent = "No accounts yet";
      return;
    }
    let wanted = null;
    try {
      wanted = sessionStorage.getItem("presenced.account");
    } catch (_) {
      wanted = null;
    }
    const first = accounts.find((a) => a.id === wanted) || accounts[0];
    select.value = first.id;
    await selectAccount(first.id);
  } else {
    select.hidden = true;
    $("account-name").hidden = false;
    await selectAccount(user.account_id);
  }
}

$("account-select").addEventListener("change", (e) => {
  try {
    sessionStorage.setItem("presenced.account", e.target.value);
  } catch (_) {
    // not remembered
  }
  selectAccount(e.target.value);
});

function canManage() {
  return state.role === "admin" || state.role === "owner";
}

function canRead() {
  return state.role !== "viewer";
}

function teardown() {
  state.generation++;
  if (state.channel) state.channel.leave();
  state.channel = null;
  state.presence = null;
  if (state.socket) state.socket.disconnect();
  state.socket = null;
  clearInterval(state.pointTimer);
}

function connectSocket() {
  if (state.socket) return;
  // The token travels in the Sec-WebSocket-Protocol header, never in the URL; phoenix.js asks
  // for it on every (re)connect, so a refreshed token is used after a drop.
  const socket = new Socket("/socket", {
    authToken: () => session.token(),
    heartbeatIntervalMs: 20000,
  });
  socket.onError(() => {
    setConn("reconnecting");
    // An expired token is the likeliest reason a reconnect keeps failing.
    session.fresh().catch(() => {});
  });
  socket.onClose(() => setConn("reconnecting"));
  socket.connect();
  state.socket = socket;
}

function setConn(s) {
  const node = $("conn-state");
  node.dataset.state = s;
  node.textContent = s === "live" ? "live" : s === "reconnecting" ? "reconnecting…" : "connecting…";
}

async function selectAccount(id) {
  // Already showing (or loading) it: nothing to do.
  if (id === state.accountId && state.channel && state.channel.state !== "closed" && state.channel.state !== "errored") return;
  const gen = ++state.generation;
  if (state.channel) state.channel.leave();
  state.accountId = id;
  state.openRoom = null;
  state.openUser = null;
  state.roomsByUser = new Map();
  $("room-detail").hidden = true;
  $("user-detail").hidden = true;
  clear($("feed"));
  clear($("alerts"));
  $("owner").hidden = !canManage();
  $("usage").hidden = !canManage();
  $("rotate-step").hidden = true;
  $("rotate-result").hidden = true;
  setConn("connecting");
  joinAccount(id);
  try {
    const dash = await session.api("GET", `/dashboard/${encodeURIComponent(id)}`);
    if (gen !== state.generation) return;
    state.account = dash.account;
    $("account-name").textContent = dash.account.name;
    $("account-plan").textContent = dash.account.plan;
    showUsage(dash.usage);
    for (const a of dash.alerts || []) addAlert(a, false);
  } catch (err) {
    toast(`Could not load the account: ${err.message}`);
  }
  setupChart();
  loadHistory(gen);
  clearInterval(state.pointTimer);
  state.pointTimer = setInterval(livePoint, LIVE_POINT_MS);
}

function joinAccount(id) {
  const channel = state.socket.channel(`account:${id}`, {});
  const presence = new Presence(channel);
  state.channel = channel;
  state.presence = presence;
  state.joinedOnce = false;
  presence.onJoin((user, current, added) => onPresenceJoin(user, current, added));
  presence.onLeave((user, current, left) => onPresenceLeave(user, current, left));
  presence.onSync(() => schedule());
  channel.on("rooms_state", (all) => {
    state.roomsByUser = new Map(Object.entries(all));
    schedule();
  });
  channel.on("rooms", ({ user, rooms }) => {
    if (rooms.length) state.roomsByUser.set(user, rooms);
    else state.roomsByUser.delete(user);
    schedule();
  });
  channel.on("usage_changed", (u) => showUsage(u));
  channel.on("billing_alert", (a) => {
    addAlert(a, true);
    toast(`Plan alert: ${a.kind} at ${a.threshold}%`);
  });
  channel.on("account_update", (a) => {
    $("account-name").textContent = a.name;
    $("account-plan").textContent = a.plan;
  });
  channel.onError(() => setConn("reconnecting"));
  channel
    .join()
    .receive("ok", () => {
      setConn("live");
      state.joinedOnce = true;
    })
    .receive("error", (e) => {
      setConn("reconnecting");
      toast(`Cannot follow this account: ${(e && e.reason) || "refused"}`);
    })
    .receive("timeout", () => setConn("reconnecting"));
}

// ---------- presence → feed ----------

function displayName(metas, id) {
  for (const m of metas) if (m && typeof m.name === "string" && m.name) return m.name;
  return id;
}

function onPresenceJoin(user, current, added) {
  // Phoenix replays the whole state as joins after a (re)join: not news.
  if (!state.joinedOnce) return;
  const swapped = added.metas.filter((m) => m.phx_ref_prev);
  if (!current) {
    feed("join", user, displayName(added.metas, user), "came online");
  } else if (swapped.length > 0) {
    for (const m of swapped) feed("status", user, displayName(added.metas, user), `is ${m.status}`);
  } else {
    const device = added.metas.map((m) => m.device).filter(Boolean).join(", ");
    feed("join", user, displayName(added.metas, user), device ? `connected on ${device}` : "connected again");
  }
}

function onPresenceLeave(user, current, left) {
  if (!state.joinedOnce) return;
  const stillRefs = new Set(current.metas.map((m) => m.phx_ref_prev).filter(Boolean));
  const gone = left.metas.filter((m) => !stillRefs.has(m.phx_ref));
  if (gone.length === 0) return; // the other half of a status change
  const name = displayName(left.metas, user);
  if (current.metas.length === 0) feed("leave", user, name, "went offline");
  else feed("leave", user, name, `left on ${gone.map((m) => m.device || "a device").join(", ")}`);
}

function feed(kind, user, name, what) {
  const list = $("feed");
  const item = el(
    "li",
    { class: "feed-item", dataset: { kind, user } },
    el("time", { text: clock(Date.now()) }),
    el("span", { class: "dot" }),
    el("span", { class: "what" }, el("strong", { text: name }), ` ${what}`),
  );
  list.prepend(item);
  while (list.children.length > FEED_MAX) list.lastChild.remove();
}

// ---------- derive and render ----------

function schedule() {
  state.dirty = true;
  if (state.frame) return;
  state.frame = requestAnimationFrame(() => {
    state.frame = 0;
    if (state.dirty) {
      state.dirty = false;
      derive();
      render();
    }
  });
}

function derive() {
  const users = [];
  const rooms = new Map();
  let connections = 0;
  if (state.presence) {
    state.presence.list((id, { metas }) => {
      connections += metas.length;
      const devices = new Set();
      let latest = metas[0];
      for (const m of metas) {
        if (m.device) devices.add(m.device);
        if ((m.online_at || 0) >= (latest.online_at || 0)) latest = m;
      }
      const userRooms = state.roomsByUser.get(id) || [];
      for (const r of userRooms) {
        let room = rooms.get(r);
        if (!room) rooms.set(r, (room = { name: r, users: new Set() }));
        room.users.add(id);
      }
      const name = displayName(metas, id);
      users.push({
        id,
        name,
        key: name.toLowerCase(),
        search: `${name} ${id}`.toLowerCase(),
        status: latest.status || "online",
        rooms: userRooms,
        devices: [...devices].sort(),
        since: Math.min(...metas.map((m) => m.online_at || Date.now())),
        metas,
      });
    });
  }
  users.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : a.id < b.id ? -1 : 1));
  state.users = users;
  state.rooms = rooms;
  state.connections = connections;
}

function filteredUsers() {
  const { q, status, room } = state.filters;
  if (!q && !status && !room) return state.users;
  const needle = q.toLowerCase();
  return state.users.filter(
    (u) =>
      (!needle || u.search.includes(needle)) &&
      (!status || u.status === status) &&
      (!room || u.rooms.includes(room)),
  );
}

function syncOptions(select, values, label) {
  const current = select.value;
  const wanted = ["", ...values];
  const have = [...select.options].map((o) => o.value);
  if (have.length === wanted.length && have.every((v, i) => v === wanted[i])) return;
  clear(select);
  select.append(el("option", { value: "", text: label }));
  for (const v of values) select.append(el("option", { value: v, text: v }));
  select.value = wanted.includes(current) ? current : "";
}

function render() {
  $("online-users").textContent = fmt(state.users.length);
  $("online-connections").textContent = fmt(state.connections);
  $("rooms-count").textContent = fmt(state.rooms.size);
  const statuses = new Set(["online", "away", "busy"]);
  for (const u of state.users) statuses.add(u.status);
  syncOptions($("status-filter"), [...statuses].sort(), "All statuses");
  syncOptions($("room-filter"), [...state.rooms.keys()].sort(), "All rooms");
  state.filters.status = $("status-filter").value;
  state.filters.room = $("room-filter").value;
  const shown = filteredUsers();
  userList.setItems(shown);
  $("users-empty").hidden = shown.length > 0 || state.users.length === 0;
  renderRooms();
  if (state.openRoom) renderRoomDetail();
  if (state.openUser) renderUserDetail();
}

const userList = new VirtualList(
  $("users"),
  ROW_HEIGHT,
  () => {
    const row = el(
      "div",
      { class: "user-row", role: "listitem", tabindex: "0" },
      el("span", { class: "dot" }),
      el("span", { class: "user-who" }, el("span", { class: "user-name" }), el("span", { class: "user-sub" })),
      el("span", { class: "user-status" }),
      el("span", { class: "user-rooms" }),
      el("span", { class: "user-devices" }),
    );
    row.addEventListener("click", () => openUser(row.dataset.user));
    row.addEventListener("keydown", (e) => {
      if (e.key === "Enter") openUser(row.dataset.user);
    });
    return row;
  },
  (u, row) => {
    row.dataset.user = u.id;
    const [dot, who, status, rooms, devices] = row.children;
    dot.className = `dot ${statusClass(u.status)}`;
    who.children[0].textContent = u.name;
    who.children[1].textContent = u.name !== u.id ? u.id : "";
    status.textContent = u.status;
    status.className = `user-status ${statusClass(u.status)}`;
    rooms.textContent = u.rooms.length ? u.rooms.join(", ") : "no room";
    devices.textContent = `${u.metas.length} × ${u.devices.length ? u.devices.join(", ") : "device"} · ${since(u.since)}`;
  },
);

for (const [id, key] of [
  ["user-search", "q"],
  ["status-filter", "status"],
  ["room-filter", "room"],
]) {
  $(id).addEventListener("input", (e) => {
    state.filters[key] = e.target.value;
    $("users").scrollTop = 0;
    schedule();
  });
}

function renderRooms() {
  const list = $("rooms");
  const rooms = [...state.rooms.values()];
  if (state.roomSort === "name") rooms.sort((a, b) => (a.name < b.name ? -1 : 1));
  else rooms.sort((a, b) => b.users.size - a.users.size || (a.name < b.name ? -1 : 1));
  const max = rooms.length ? Math.max(...rooms.map((r) => r.users.size)) : 1;
  clear(list);
  for (const r of rooms.slice(0, ROOMS_SHOWN)) {
    const bar = el("i");
    bar.style.width = `${Math.round((100 * r.users.size) / max)}%`;
    list.append(
      el(
        "div",
        {
          class: "room-row",
          role: "listitem",
          tabindex: "0",
          dataset: { room: r.name },
          onclick: () => openRoom(r.name),
          onkeydown: (e) => e.key === "Enter" && openRoom(r.name),
        },
        el("span", { class: "room-name", text: r.name }),
        el("span", { class: "room-users", text: `${fmt(r.users.size)}` }),
        el("span", { class: "room-bar" }, bar),
      ),
    );
  }
  if (rooms.length === 0) list.append(el("p", { class: "muted empty", text: "No room is in use." }));
}

$("rooms-sort").addEventListener("change", (e) => {
  state.roomSort = e.target.value;
  renderRooms();
});

function openRoom(name) {
  state.openRoom = name;
  $("user-detail").hidden = true;
  state.openUser = null;
  $("room-detail").hidden = false;
  renderRoomDetail();
}

function renderRoomDetail() {
  const name = state.openRoom;
  $("room-detail-name").textContent = `# ${name}`;
  const members = state.users.filter((u) => u.rooms.includes(name));
  $("room-detail-count").textContent = `${fmt(members.length)} users online here`;
  const box = $("room-members");
  clear(box);
  for (const u of members.slice(0, 500)) {
    box.append(
      el(
        "div",
        { class: "member-row", dataset: { user: u.id } },
        el("span", { class: `dot ${statusClass(u.status)}` }),
        el("span", { class: "name", text: u.name }),
        el("span", { class: `status ${statusClass(u.status)}`, text: u.status }),
      ),
    );
  }
  if (members.length > 500) box.append(el("p", { class: "muted", text: `and ${fmt(members.length - 500)} more` }));
}

$("room-detail-close").addEventListener("click", () => {
  state.openRoom = null;
  $("room-detail").hidden = true;
});

function openUser(id) {
  state.openUser = id;
  state.openRoom = null;
  state.userSessions = null;
  state.userRefs = "";
  $("room-detail").hidden = true;
  $("user-detail").hidden = false;
  renderUserDetail();
}

/** Where-now of the open user (session ids for kicks), fetched again when their metas change. */
async function loadUserSessions(id, refs) {
  if (!canRead()) return;
  try {
    const w = await session.api("GET", `/accounts/${encodeURIComponent(state.accountId)}/users/${encodeURIComponent(id)}/presence`);
    if (state.openUser !== id || state.userRefs !== refs) return;
    state.userSessions = w.sessions || [];
    state.userLastSeen = w.last_seen || null;
    renderUserDetail();
  } catch (_) {
    // the live metas are shown anyway
  }
}

function renderUserDetail() {
  const u = state.users.find((x) => x.id === state.openUser);
  const box = $("user-sessions");
  clear(box);
  if (!u) {
    $("user-detail-name").textContent = state.openUser;
    $("user-detail-id").textContent = state.userLastSeen
      ? `offline · last seen ${new Date(state.userLastSeen).toLocaleString()}`
      : "offline";
    if (state.userRefs !== "offline") {
      state.userRefs = "offline";
      loadUserSessions(state.openUser, "offline");
    }
    return;
  }
  $("user-detail-name").textContent = u.name;
  $("user-detail-id").textContent = `${u.id} · online since ${clock(u.since)} · rooms: ${u.rooms.join(", ") || "none"}`;
  const refs = u.metas.map((m) => m.phx_ref).join(",");
  if (refs !== state.userRefs) {
    state.userRefs = refs;
    loadUserSessions(u.id, refs);
  }
  const sessions = state.userSessions || u.metas;
  for (const m of sessions) {
    const extra = Object.entries(m)
      .filter(([k]) => !["phx_ref", "phx_ref_prev", "status", "online_at", "device", "rooms", "session_id", "connected", "name"].includes(k))
      .map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`)
      .join(" · ");
    const where = m.rooms ? `rooms: ${m.rooms.join(", ") || "none"} · ` : "";
    box.append(
      el(
        "div",
        { class: "session", dataset: { session: m.session_id || "" } },
        el("strong", { text: m.device || "device" }),
        el("span", { class: `status ${statusClass(m.status)}`, text: m.status }),
        el("span", { class: "meta", text: `${where}since ${clock(m.online_at)}${m.connected === false ? " · reconnecting" : ""}` }),
        extra ? el("span", { class: "meta", text: extra }) : null,
        canManage() && m.session_id
          ? el("button", { type: "button", class: "danger kick", dataset: { session: m.session_id }, text: "Kick", onclick: () => kick(m.session_id) })
          : null,
      ),
    );
  }
}

$("user-detail-close").addEventListener("click", () => {
  state.openUser = null;
  $("user-detail").hidden = true;
});

async function kick(sid) {
  try {
    await session.api("DELETE", `/accounts/${encodeURIComponent(state.accountId)}/sessions/${encodeURIComponent(sid)}`);
    toast("Session disconnected");
  } catch (err) {
    toast(`Kick failed: ${err.message}`);
  }
}

// ---------- usage and billing ----------

function meter(valueId, barId, used, limit) {
  $(valueId).textContent = `${fmt(used)} / ${fmt(limit)}`;
  const pct = limit > 0 ? Math.min(100, (100 * used) / limit) : 0;
  const bar = $(barId);
  bar.style.width = `${pct}%`;
  bar.className = pct >= 100 ? "full" : pct >= 80 ? "warn" : "";
}

function showUsage(u) {
  if (!u || !canManage()) return;
  meter("usage-connections", "usage-connections-bar", u.connections.used, u.connections.limit);
  meter("usage-messages", "usage-messages-bar", u.messages_today.used, u.messages_today.limit);
}

function addAlert(a, fresh) {
  if (!canManage()) return;
  const box = $("alerts");
  const item = el(
    "div",
    { class: `alert${a.threshold >= 100 ? " full" : ""}`, dataset: { kind: a.kind, threshold: a.threshold } },
    el("strong", { text: `${a.kind} at ${a.threshold}%` }),
    ` — ${fmt(a.value)} of ${fmt(a.limit)} (${a.period})`,
  );
  if (fresh) box.prepend(item);
  else box.append(item);
}

$("rotate-secret").addEventListener("click", () => {
  $("rotate-step").hidden = false;
  $("rotate-result").hidden = true;
});
$("rotate-cancel").addEventListener("click", () => {
  $("rotate-step").hidden = true;
});
$("rotate-confirm").addEventListener("click", async () => {
  try {
    const r = await session.api("POST", `/accounts/${encodeURIComponent(state.accountId)}/secret/rotate`, {});
    $("rotate-step").hidden = true;
    $("rotate-result").hidden = false;
    $("new-secret").value = r.signing_secret;
    $("rotate-grace").textContent = `The previous secret keeps working until ${new Date(r.previous_expires_at).toLocaleString()}.`;
  } catch (err) {
    toast(`Rotation failed: ${err.message}`);
  }
});

// ---------- chart ----------

function chartWidth() {
  return Math.max(280, $("chart").clientWidth || 600);
}

function setupChart() {
  if (state.chart) {
    state.chart.destroy();
    state.chart = null;
  }
  state.chartData = [[], [], []];
  const styles = getComputedStyle(document.documentElement);
  state.chart = new uPlot(
    {
      width: chartWidth(),
      height: 220,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      axes: [
        { stroke: styles.getPropertyValue("--muted"), grid: { stroke: "rgba(142,160,189,.12)" } },
        { stroke: styles.getPropertyValue("--muted"), grid: { stroke: "rgba(142,160,189,.12)" } },
      ],
      series: [
        {},
        { label: "users", stroke: "#22c55e", width: 2, fill: "rgba(34,197,94,.08)" },
        { label: "connections", stroke: "#60a5fa", width: 1.5 },
      ],
    },
    state.chartData,
    $("chart"),
  );
}

new ResizeObserver(() => {
  if (state.chart) state.chart.setSize({ width: chartWidth(), height: 220 });
}).observe($("chart"));

async function loadHistory(gen) {
  const to = Date.now();
  const from = to - state.rangeMs;
  const note = $("chart-note");
  note.textContent = "";
  let points = [];
  if (canRead()) {
    try {
      const h = await session.api("GET", `/accounts/${encodeURIComponent(state.accountId)}/presence/history?from=${from}&to=${to}`);
      points = h.series || [];
    } catch (err) {
      note.textContent = `History unavailable (${err.message}); showing live points only.`;
    }
  } else {
    note.textContent = "Live points since you opened the page.";
  }
  if (gen !== state.generation) return;
  state.chartData = [points.map((p) => p.at / 1000), points.map((p) => p.users), points.map((p) => p.connections)];
  state.lastPoint = 0;
  livePoint();
}

function livePoint() {
  if (!state.chart) return;
  const now = Date.now();
  const [xs, us, cs] = state.chartData;
  xs.push(now / 1000);
  us.push(state.users.length);
  cs.push(state.connections);
  const cutoff = (now - state.rangeMs) / 1000;
  while (xs.length > 2 && xs[0] < cutoff) {
    xs.shift();
    us.shift();
    cs.shift();
  }
  state.lastPoint = now;
  state.chart.setData(state.chartData);
}

$("range-select").addEventListener("change", (e) => {
  state.rangeMs = Number(e.target.value);
  loadHistory(state.generation);
});

// ---------- start ----------

(async () => {
  if (await session.resume()) {
    try {
      await showApp();
      return;
    } catch (_) {
      // fall through to the login form
    }
  }
  showLogin("");
})();
