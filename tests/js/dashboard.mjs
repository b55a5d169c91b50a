#!/usr/bin/env node
// End-to-end tests of presenced's live dashboard in headless Chromium (playwright-core), with
// end users' sockets opened here through the official phoenix client.
//
//   node dashboard.mjs <scenario> <base url>
//
// Scenarios: live, xss, responsive, roles, owner, reconnect, expiry (see SCENARIOS below).
// Inputs from the environment (tests/it/dashboard.rs sets them):
//   DASH_ACCOUNT, DASH_SECRET            the account under test and its signing secret
//   DASH_ADMIN_EMAIL, DASH_ADMIN_PASSWORD admin credentials
//   DASH_PASSWORD                         password of the other dashboard users
//   DASH_MEMBER_EMAIL, DASH_VIEWER_EMAIL, DASH_OWNER_EMAIL, DASH_OTHER_ACCOUNT, DASH_OTHER_SECRET
//   DASH_CHROMIUM (default /usr/bin/chromium), DASH_SCREENSHOTS (default ../../target/screenshots)
//   DASH_HEADFUL=1 shows the browser, DASH_DEBUG=1 echoes the page's console.
// Scenarios that restart the node print "@@ctrl stop" / "@@ctrl start" and wait for "ok" on stdin.
//
// Output: "ok - <step>" / "not ok - <step>: <why>", "# ..." notes, last line "N passed, M failed".
// A scenario stops at its first failed step. Every wait is bounded (WAIT, 10 s by default): the
// checks assert what the page shows, never how fast.

import crypto from "node:crypto"
import fs from "node:fs"
import path from "node:path"
import readline from "node:readline"
import {fileURLToPath} from "node:url"

import {chromium} from "playwright-core"
import {Socket} from "phoenix"
import WebSocket from "ws"

const HERE = path.dirname(fileURLToPath(import.meta.url))
const [scenario, baseArg] = process.argv.slice(2)
const BASE = (baseArg || "").replace(/\/+$/, "")
const env = process.env
const WAIT = Number(env.DASH_WAIT_MS || 10000)
const SHOTS = env.DASH_SCREENSHOTS || path.join(HERE, "../../target/screenshots")
const ACCOUNT = env.DASH_ACCOUNT
const SECRET = env.DASH_SECRET
const WS_URL = BASE.replace(/^http/, "ws") + "/socket"

// ---------------------------------------------------------------------------------------------
// Reporting

let passed = 0
let failed = 0
const cleanups = []

async function step(name, fn){
  try {
    const r = await fn()
    passed++
    console.log(`ok - ${name}`)
    return r
  } catch(e){
    failed++
    console.log(`not ok - ${name}: ${String(e && e.message || e).split("\n").slice(0, 12).join(" | ")}`)
    throw new Abort()
  }
}
class Abort extends Error {}

/** A check whose failure is reported but does not stop the scenario (independent of what follows). */
async function check(name, fn){
  try { await step(name, fn) } catch(e){ if(!(e instanceof Abort)){ throw e } }
}

function note(s){ console.log(`# ${s}`) }

function assert(cond, why){ if(!cond){ throw new Error(why) } }
function assertEq(actual, expected, what){
  if(JSON.stringify(actual) !== JSON.stringify(expected)){
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`)
  }
}

const sleep = ms => new Promise(r => setTimeout(r, ms))

/** Polls `fn` (Node side) until it returns a truthy value, or fails after `ms`. */
async function until(what, fn, ms = WAIT){
  const deadline = Date.now() + ms
  let last
  for(;;){
    try { last = await fn(); if(last){ return last } } catch(e){ last = e }
    if(Date.now() > deadline){ throw new Error(`timed out waiting for ${what} (last: ${show(last)})`) }
    await sleep(50)
  }
}

function show(v, n = 300){
  let s
  try { s = v instanceof Error ? v.message : JSON.stringify(v) } catch { s = String(v) }
  return s === undefined ? "undefined" : s.length > n ? s.slice(0, n) + "…" : s
}

// ---------------------------------------------------------------------------------------------
// Control requests to the Rust side (stop / start the node)

const stdinLines = readline.createInterface({input: process.stdin})
const answers = []
let answerWaiter = null
stdinLines.on("line", l => { answers.push(l); if(answerWaiter){ answerWaiter() } })

async function ctrl(what){
  console.log(`@@ctrl ${what}`)
  await until(`the driver to ${what} the node`, () => answers.length > 0, 60000)
  const a = answers.shift()
  assert(a === "ok", `driver answered ${a}`)
}

// ---------------------------------------------------------------------------------------------
// HTTP API and tokens

async function api(method, p, token, body){
  const res = await fetch(`${BASE}/api/v1${p}`, {
    method,
    headers: {
      ...(token ? {authorization: `Bearer ${token}`} : {}),
      ...(body === undefined ? {} : {"content-type": "application/json"}),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  const text = await res.text()
  let json = null
  try { json = JSON.parse(text) } catch {}
  return {status: res.status, body: json}
}

const b64url = data => Buffer.from(data).toString("base64url")
function userToken(sub, {name, meta, secret = SECRET, acc = ACCOUNT, ttl = 3600} = {}){
  const iat = Math.floor(Date.now() / 1000)
  const claims = {sub, acc, iat, exp: iat + ttl}
  if(name !== undefined){ claims.name = name }
  if(meta !== undefined){ claims.meta = meta }
  const input = `${b64url(JSON.stringify({alg: "HS256", typ: "JWT"}))}.${b64url(JSON.stringify(claims))}`
  return `${input}.${crypto.createHmac("sha256", secret).update(input).digest("base64url")}`
}

// ---------------------------------------------------------------------------------------------
// End users: one phoenix.js socket per connection (device), joined to rooms.

/**
 * Connects `sub` and joins `rooms` with `status`/`meta`. `reconnect: false` keeps a socket the
 * server closed (a kick) closed for the rest of the scenario. `announce` (default) also pushes a
 * status other than online after the join: the server's account-wide view (what the dashboard
 * shows) takes a connection's status from `status` pushes only, not from the join payload.
 */
async function connectUser(sub, {name, meta = {}, status = "online", rooms = ["lobby"], device,
  tokenMeta, secret, acc, reconnect = true, announce = true} = {}){
  const m = {...meta}
  // A device is a property of the connection: the customer's backend puts it in the token's
  // meta (what the account-wide view shows), and the client repeats it in its room metas.
  if(device !== undefined){ m.device = device }
  const tm = {...(tokenMeta || {}), ...(device !== undefined ? {device} : {})}
  const token = userToken(sub, {name, secret, acc, meta: Object.keys(tm).length ? tm : undefined})
  const socket = new Socket(WS_URL, {
    params: {token},
    transport: WebSocket,
    heartbeatIntervalMs: 1000,
    reconnectAfterMs: tries => reconnect ? ([50, 100, 200, 500][tries - 1] ?? 1000) : 3600000,
    rejoinAfterMs: tries => ([100, 200, 500][tries - 1] ?? 1000),
    timeout: 5000,
  })
  const user = {sub, socket, channels: new Map(), closes: 0, opens: 0}
  socket.onOpen(() => { user.opens++ })
  socket.onClose(() => { user.closes++ })
  socket.connect()
  cleanups.push(() => { try { socket.disconnect() } catch {} })
  // A rejoin (after a reconnect) re-sends the join params: like a real app, send the status the
  // user has now, not the one they joined with.
  let current = status
  for(const room of rooms){
    const ch = socket.channel(`room:${room}`, () => ({status: current, meta: m}))
    await new Promise((resolve, reject) => {
      ch.join()
        .receive("ok", resolve)
        .receive("error", r => reject(new Error(`${sub} join room:${room} refused: ${show(r)}`)))
        .receive("timeout", () => reject(new Error(`${sub} join room:${room} timed out`)))
    })
    user.channels.set(room, ch)
  }
  user.setStatus = async (s, extra = {}) => {
    current = s
    for(const ch of user.channels.values()){
      await new Promise((resolve, reject) => {
        ch.push("status", {status: s, meta: {...m, ...extra}})
          .receive("ok", resolve)
          .receive("error", r => reject(new Error(`status refused: ${show(r)}`)))
          .receive("timeout", () => reject(new Error("status timed out")))
      })
    }
  }
  user.leave = async () => {
    for(const ch of user.channels.values()){
      await new Promise(resolve => ch.leave().receive("ok", resolve).receive("timeout", resolve))
    }
    socket.disconnect()
  }
  if(announce && status !== "online"){ await user.setStatus(status) }
  return user
}

// ---------------------------------------------------------------------------------------------
// The browser

let browser

async function launch(){
  browser = await chromium.launch({
    executablePath: env.DASH_CHROMIUM || "/usr/bin/chromium",
    headless: !env.DASH_HEADFUL,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  })
  cleanups.push(() => browser.close().catch(() => {}))
}

const DESKTOP = {viewport: {width: 1440, height: 900}}
const MOBILE = {viewport: {width: 375, height: 812}, deviceScaleFactor: 2, isMobile: true, hasTouch: true}

/** A fresh page (own context: own sessionStorage) that records what a test may want to deny. */
async function openPage(opts = DESKTOP){
  const context = await browser.newContext({...opts})
  const page = await context.newPage()
  page.setDefaultTimeout(WAIT)
  const log = {dialogs: [], consoleErrors: [], pageErrors: [], api: []}
  page.on("dialog", d => { log.dialogs.push(`${d.type()}: ${d.message()}`); d.dismiss().catch(() => {}) })
  page.on("console", m => {
    if(env.DASH_DEBUG){ console.error(`[page ${m.type()}] ${m.text()}`) }
    if(m.type() === "error"){ log.consoleErrors.push(m.text()) }
  })
  page.on("pageerror", e => log.pageErrors.push(String(e && e.stack || e)))
  page.on("response", r => {
    const u = new URL(r.url())
    if(u.pathname.startsWith("/api/v1/")){ log.api.push({path: u.pathname, status: r.status(), at: Date.now()}) }
  })
  await context.addInitScript(() => {
    window.__csp = []
    document.addEventListener("securitypolicyviolation", e => {
      window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`)
    })
  })
  page.log = log
  cleanups.push(() => context.close().catch(() => {}))
  return page
}

/** Waits (in the page) until `fn(arg)` is truthy; the error names `what`. */
async function waitIn(page, what, fn, arg, ms = WAIT){
  try {
    return await page.waitForFunction(fn, arg, {timeout: ms, polling: 50})
  } catch(e){
    const state = await page.evaluate(() => ({
      conn: document.querySelector("#conn-state")?.dataset.state,
      users: [...document.querySelectorAll("#users .user-row")].slice(0, 8).map(r => `${r.dataset.user}:${r.querySelector(".user-status")?.textContent}`),
      count: document.querySelector("#users")?.dataset.count,
      error: document.querySelector("#login-error")?.textContent,
    })).catch(() => null)
    throw new Error(`timed out waiting for ${what}; page: ${show(state, 400)}`)
  }
}

const visible = (page, sel) => page.locator(sel).first().isVisible()

async function login(page, email, password){
  const res = await page.goto(`${BASE}/`)
  await page.locator("#login-email").waitFor({state: "visible", timeout: WAIT})
  await page.fill("#login-email", email)
  await page.fill("#login-password", password)
  await page.click("#login-submit")
  await page.locator("#app").waitFor({state: "visible", timeout: WAIT})
  return res
}

async function loginAdminTo(page, account = ACCOUNT){
  await login(page, env.DASH_ADMIN_EMAIL, env.DASH_ADMIN_PASSWORD)
  await page.locator("#account-select").waitFor({state: "visible", timeout: WAIT})
  await waitIn(page, "the account offered in #account-select",
    a => !!document.querySelector(`#account-select option[value="${a}"]`), account)
  // Only a real change: a user cannot re-select the selected option (no change event then).
  if(await page.locator("#account-select").inputValue() !== account){
    await page.selectOption("#account-select", account)
  }
  await waitLive(page)
}

async function waitLive(page, ms = WAIT){
  await waitIn(page, "#conn-state live", () => document.querySelector("#conn-state")?.dataset.state === "live", null, ms)
}

const rowSel = user => `#users .user-row[data-user="${user}"]`

async function waitRow(page, user, {status, name} = {}, ms = WAIT){
  await waitIn(page, `row of ${user}${status ? ` with status ${status}` : ""}`, ([sel, status, name]) => {
    const row = document.querySelector(sel)
    if(!row){ return false }
    if(status !== undefined && row.querySelector(".user-status")?.textContent.trim() !== status){ return false }
    if(name !== undefined){
      // The name, as text; the page may add the id in a .user-sub child when they differ.
      const n = row.querySelector(".user-name")
      const sub = n?.querySelector(".user-sub")?.textContent || ""
      const text = (n?.textContent || "")
      const own = sub && text.endsWith(sub) ? text.slice(0, text.length - sub.length) : text
      if(own.trim() !== name){ return false }
    }
    return true
  }, [rowSel(user), status, name], ms)
}

async function waitNoRow(page, user, ms = WAIT){
  await waitIn(page, `row of ${user} gone`, sel => !document.querySelector(sel), rowSel(user), ms)
}

/** The number shown in `sel` ("1,234" → 1234). */
async function numberIn(page, sel){
  const t = await page.locator(sel).first().textContent()
  return Number(String(t).replace(/[^0-9.-]/g, ""))
}

async function waitNumber(page, sel, n, ms = WAIT){
  await waitIn(page, `${sel} to show ${n}`, ([sel, n]) => {
    const t = document.querySelector(sel)?.textContent || ""
    return Number(t.replace(/[^0-9.-]/g, "")) === n && /\d/.test(t)
  }, [sel, n], ms)
}

async function waitFeed(page, kind, user, ms = WAIT){
  await waitIn(page, `feed item ${kind} of ${user}`,
    ([k, u]) => !!document.querySelector(`#feed .feed-item[data-kind="${k}"][data-user="${u}"]`), [kind, user], ms)
}

async function rowsShown(page){
  return page.evaluate(() => [...document.querySelectorAll("#users .user-row")].map(r => r.dataset.user).sort())
}

async function waitCount(page, n, ms = WAIT){
  await waitIn(page, `#users data-count ${n}`, n => document.querySelector("#users")?.dataset.count === String(n), n, ms)
}

async function noOverflow(page, what){
  const m = await page.evaluate(() => ({scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
    body: document.body.scrollWidth}))
  assert(m.scroll <= m.inner, `${what}: horizontal overflow, scrollWidth ${m.scroll} > innerWidth ${m.inner}`)
}

async function shot(page, name, opts = {}){
  fs.mkdirSync(SHOTS, {recursive: true})
  const file = path.join(SHOTS, `${name}.png`)
  await page.screenshot({path: file, ...opts})
  note(`screenshot ${file}`)
}

function pageErrorsFree(page){
  assert(page.log.pageErrors.length === 0, `uncaught errors in the page: ${show(page.log.pageErrors, 800)}`)
}

/** The room row for `room`, whether the page names rooms with or without the topic prefix. */
const roomSel = room => `#rooms .room-row[data-room="${room}"], #rooms .room-row[data-room="room:${room}"]`

// ---------------------------------------------------------------------------------------------
// Scenarios

const SCENARIOS = {}

// (a) Live presence for an admin: join, status, leave; counters, filters, rooms, feed.
SCENARIOS.live = async () => {
  await launch()
  const page = await openPage()
  await step("the page is served at / as text/html", async () => {
    const res = await page.goto(`${BASE}/`)
    assertEq(res.status(), 200, "GET / status")
    assert((res.headers()["content-type"] || "").startsWith("text/html"), `content-type ${res.headers()["content-type"]}`)
  })
  await step("the admin logs in, picks the account and the socket is live", () => loginAdminTo(page))
  const alice = await connectUser("alice", {name: "Alice Liddell", status: "online", rooms: ["lobby"], device: "laptop"})
  const bob = await connectUser("bob", {name: "Bob Stone", status: "busy", rooms: ["lobby", "design"], device: "laptop"})
  const carol1 = await connectUser("carol", {name: "Carol Ng", status: "away", rooms: ["support"], device: "laptop"})
  await connectUser("carol", {name: "Carol Ng", status: "away", rooms: ["support"], device: "phone"})
  await step("users who joined show with name and status", async () => {
    await waitRow(page, "alice", {status: "online", name: "Alice Liddell"})
    await waitRow(page, "bob", {status: "busy", name: "Bob Stone"})
    await waitRow(page, "carol", {status: "away", name: "Carol Ng"})
  })
  await step("counters: 3 users online, 4 connections", async () => {
    await waitNumber(page, "#online-users", 3)
    await waitNumber(page, "#online-connections", 4)
    await waitCount(page, 3)
  })
  await step("each join is in the feed", async () => {
    for(const u of ["alice", "bob", "carol"]){ await waitFeed(page, "join", u) }
  })
  await step("search narrows the list to matching users", async () => {
    await page.fill("#user-search", "carol")
    await waitCount(page, 1)
    assertEq(await rowsShown(page), ["carol"], "rows while searching carol")
    await page.fill("#user-search", "")
    await waitCount(page, 3)
  })
  await step("the status filter shows only users in that status", async () => {
    await page.selectOption("#status-filter", "busy", {timeout: WAIT})
    await waitCount(page, 1)
    assertEq(await rowsShown(page), ["bob"], "rows with status busy")
    await page.selectOption("#status-filter", "")
    await waitCount(page, 3)
  })
  let dave
  await step("a new user joining appears live, with its status, in the list and the feed", async () => {
    dave = await connectUser("dave", {name: "Dave Park", status: "online", rooms: ["lobby"]})
    await waitRow(page, "dave", {status: "online", name: "Dave Park"})
    await waitFeed(page, "join", "dave")
    await waitNumber(page, "#online-users", 4)
  })
  await step("a status change updates .user-status and shows in the feed", async () => {
    await dave.setStatus("away")
    await waitRow(page, "dave", {status: "away"})
    await waitFeed(page, "status", "dave")
    await carol1.setStatus("busy")
    await waitIn(page, "carol's status busy (one of her two connections changed)", sel => {
      const s = document.querySelector(sel)?.querySelector(".user-status")?.textContent.trim()
      return s === "busy" || s === "away"
    }, rowSel("carol"))
  })
  await check("each row shows the user's rooms", async () => {
    await waitIn(page, "bob's rooms lobby and design in .user-rooms", sel => {
      const t = document.querySelector(sel)?.querySelector(".user-rooms")?.textContent || ""
      return t.includes("lobby") && t.includes("design")
    }, rowSel("bob"))
  })
  await check("each row shows the user's devices (meta.device of each connection)", async () => {
    await waitIn(page, "carol's two devices (laptop, phone) in .user-devices", sel => {
      const t = document.querySelector(sel)?.querySelector(".user-devices")?.textContent || ""
      return t.includes("laptop") && t.includes("phone")
    }, rowSel("carol"))
  })
  await check("the room filter shows only users in that room", async () => {
    const value = await page.evaluate(() => [...document.querySelectorAll("#room-filter option")]
      .map(o => o.value).find(v => v === "design" || v === "room:design"))
    assert(value, "#room-filter offers the room design")
    await page.selectOption("#room-filter", value)
    await waitCount(page, 1)
    assertEq(await rowsShown(page), ["bob"], "rows in room design")
    await page.selectOption("#room-filter", "")
    await waitCount(page, 4)
  })
  await check("rooms list occupancy; a room's detail lists its members", async () => {
    await waitIn(page, "lobby room row with 3 users", sel => {
      const r = document.querySelector(sel)
      return r && parseInt((r.querySelector(".room-users")?.textContent || "").replace(/,/g, ""), 10) === 3
    }, roomSel("lobby"))
    await page.locator(roomSel("lobby")).first().click()
    await page.locator("#room-detail").waitFor({state: "visible", timeout: WAIT})
    await waitIn(page, "members alice, bob and dave in #room-detail", () => {
      const m = [...document.querySelectorAll("#room-detail .member-row")].map(r => r.dataset.user).sort()
      return JSON.stringify(m) === JSON.stringify(["alice", "bob", "dave"])
    })
    await page.locator("#room-detail-close").click()
  })
  // Whatever the soft checks left behind: no filter, no drawer.
  await page.selectOption("#room-filter", "").catch(() => {})
  if(await visible(page, "#room-detail")){ await page.locator("#room-detail-close").click() }
  await step("a user leaving disappears from the list and shows in the feed", async () => {
    await dave.leave()
    await waitNoRow(page, "dave")
    await waitFeed(page, "leave", "dave")
    await waitNumber(page, "#online-users", 3)
    await alice.leave()
    await waitNoRow(page, "alice")
    await waitFeed(page, "leave", "alice")
    await waitNumber(page, "#online-users", 2)
  })
  await step("a user with two connections stays while one remains", async () => {
    await bob.leave()
    await waitNoRow(page, "bob")
    await carol1.leave()
    await sleep(300) // give a wrong leave the chance to show
    await waitRow(page, "carol")
    await waitNumber(page, "#online-connections", 1)
  })
  await check("a status given in the join payload shows (no status push)", async () => {
    await connectUser("erin", {name: "Erin Joined-Busy", status: "busy", rooms: ["lobby"], announce: false})
    await waitRow(page, "erin", {status: "busy"})
  })
  await step("no uncaught error in the page", async () => pageErrorsFree(page))
}

// (b) Hostile strings are text; the CSP forbids inline script.
const XSS_NAME = `<img src=x onerror=alert(1)>`
const XSS_META = `"><script>alert(2)</script>`
SCENARIOS.xss = async () => {
  await launch()
  const page = await openPage()
  await step("GET / carries a CSP whose script-src is 'self' without 'unsafe-inline'", async () => {
    const res = await page.goto(`${BASE}/`)
    const csp = res.headers()["content-security-policy"]
    assert(csp, "no Content-Security-Policy header on /")
    const dirs = Object.fromEntries(csp.split(";").map(d => d.trim()).filter(Boolean).map(d => {
      const [k, ...v] = d.split(/\s+/)
      return [k.toLowerCase(), v]
    }))
    const script = dirs["script-src"] || dirs["default-src"]
    assert(script, `no script-src nor default-src in ${csp}`)
    assert(script.includes("'self'"), `script-src lacks 'self': ${csp}`)
    assert(!script.includes("'unsafe-inline'"), `script-src allows 'unsafe-inline': ${csp}`)
    assert(!script.includes("'unsafe-eval'"), `script-src allows 'unsafe-eval': ${csp}`)
    assert(!script.includes("*") && !script.some(s => /^(https?:|data:)$/.test(s)), `script-src too wide: ${csp}`)
  })
  await step("the admin logs in; the hostile account name is an option's text", async () => {
    await loginAdminTo(page)
    const text = await page.locator(`#account-select option[value="${ACCOUNT}"]`).textContent()
    assert(text.includes("<img src=x onerror=alert('acc')>"), `account option shows ${JSON.stringify(text)}`)
  })
  // Statuses and room names are [a-z0-9_-] on the server: the payloads ride in names and metas.
  const hostileMeta = {note: XSS_META, title: `<b onmouseover=alert(3)>boss</b>`}
  await connectUser("mallory", {name: XSS_NAME, status: "busy", rooms: ["lobby"], device: XSS_META,
    meta: hostileMeta, tokenMeta: hostileMeta})
  await connectUser("trent", {name: XSS_META, status: "online", rooms: ["lobby"], device: XSS_NAME})
  await step("names show as literal text, in the list and the feed", async () => {
    await waitRow(page, "mallory", {name: XSS_NAME})
    await waitRow(page, "trent", {name: XSS_META})
    await waitFeed(page, "join", "mallory")
    const feed = await page.locator(`#feed .feed-item[data-user="mallory"]`).first().textContent()
    assert(feed.includes(XSS_NAME), `mallory's feed item shows ${JSON.stringify(feed)}`)
  })
  await check("metas show as literal text in the row", async () => {
    await waitIn(page, "mallory's device as text in .user-devices", ([sel, p]) =>
      (document.querySelector(sel)?.querySelector(".user-devices")?.textContent || "").includes(p), [rowSel("mallory"), XSS_META])
  })
  await check("the user's detail shows the name and metas as text", async () => {
    await page.locator(rowSel("mallory")).click()
    await page.locator("#user-detail").waitFor({state: "visible", timeout: WAIT})
    await waitIn(page, "the name in #user-detail", p => (document.querySelector("#user-detail")?.textContent || "").includes(p), XSS_NAME)
    await waitIn(page, "a meta in #user-detail", p => (document.querySelector("#user-detail")?.textContent || "").includes(p), XSS_META)
  })
  if(await visible(page, "#user-detail")){ await page.locator("#user-detail-close").click() }
  await check("the room's detail shows the name as text", async () => {
    await page.locator(roomSel("lobby")).first().click({timeout: WAIT})
    await page.locator("#room-detail").waitFor({state: "visible", timeout: WAIT})
    await waitIn(page, "mallory's name in #room-detail", p => [...document.querySelectorAll(`#room-detail .member-row[data-user="mallory"]`)]
      .some(r => r.textContent.includes(p)), XSS_NAME)
  })
  await sleep(300) // let any injected handler fire before the checks below
  await step("no dialog fired", async () => assertEq(page.log.dialogs, [], "dialogs"))
  await step("no element from the payloads exists", async () => {
    const found = await page.evaluate(() => ({
      img: document.querySelectorAll('img[src="x"]').length,
      b: document.querySelectorAll("b[onmouseover]").length,
      handlers: document.querySelectorAll("[onerror], [onmouseover], [onload]").length,
      scripts: [...document.querySelectorAll("script")].filter(s => !s.src || /alert/.test(s.textContent)).length,
    }))
    assertEq(found, {img: 0, b: 0, handlers: 0, scripts: 0}, "payload elements")
  })
  await step("no CSP violation, console error or uncaught error", async () => {
    const csp = await page.evaluate(() => window.__csp)
    assertEq(csp, [], "CSP violations")
    assertEq(page.log.consoleErrors, [], "console errors")
    pageErrorsFree(page)
  })
}

// (c) Phone and desktop layouts, with screenshots.
const PEOPLE = [
  ["ada", "Ada Lovelace", "online", ["lobby", "eng-standup"], ["laptop", "phone"]],
  ["grace", "Grace Hopper", "busy", ["eng-standup"], ["laptop"]],
  ["alan", "Alan Turing", "away", ["lobby"], ["desktop"]],
  ["katherine", "Katherine Johnson", "online", ["design-review", "lobby"], ["tablet"]],
  ["linus", "Linus Torvalds", "busy", ["eng-standup", "support"], ["laptop"]],
  ["margaret", "Margaret Hamilton", "online", ["support"], ["laptop", "phone"]],
  ["dennis", "Dennis Ritchie", "online", ["lobby"], ["desktop"]],
  ["barbara", "Barbara Liskov", "away", ["design-review"], ["laptop"]],
  ["edsger", "Edsger Dijkstra", "in-a-meeting", ["design-review"], ["laptop"]],
  ["frances", "Frances Allen", "online", ["support", "lobby"], ["phone"]],
  ["ken", "Ken Thompson", "busy", ["eng-standup"], ["desktop"]],
  ["hedy", "Hedy Lamarr", "online", ["lobby"], ["phone"]],
  ["donald", "Donald Knuth", "away", ["support"], ["laptop"]],
  ["radia", "Radia Perlman", "online", ["eng-standup", "design-review"], ["laptop", "tablet"]],
  ["tim", "Tim Berners-Lee", "online", ["lobby"], ["laptop"]],
  ["sophie", "Sophie Wilson", "busy", ["design-review"], ["desktop"]],
  ["john", "John McCarthy", "online", ["support"], ["laptop"]],
  ["shafi", "Shafi Goldwasser", "away", ["lobby"], ["phone"]],
]

async function seedPeople(){
  const users = {}
  for(const [sub, name, status, rooms, devices] of PEOPLE){
    for(const device of devices){
      users[sub] = await connectUser(sub, {name, status, rooms, device})
    }
  }
  return users
}

SCENARIOS.responsive = async () => {
  await launch()
  const people = await seedPeople()
  // A little activity for the feed.
  const late = await connectUser("guido", {name: "Guido van Rossum", status: "online", rooms: ["lobby"], device: "laptop"})
  await late.setStatus("busy")
  for(const [label, opts] of [["mobile", MOBILE], ["desktop", DESKTOP]]){
    const page = await openPage(opts)
    await step(`${label}: the login screen fits`, async () => {
      await page.goto(`${BASE}/`)
      await page.locator("#login-email").waitFor({state: "visible", timeout: WAIT})
      await noOverflow(page, "login")
      await shot(page, `${label}-login`)
    })
    await step(`${label}: the main screen fits, with every user listed`, async () => {
      await loginAdminTo(page)
      await waitNumber(page, "#online-users", PEOPLE.length + 1)
      // Some live activity for the feed.
      const mobile = label === "mobile"
      await people.ada.setStatus("busy")
      await people.alan.setStatus(mobile ? "online" : "away")
      const visitor = await connectUser("niklaus", {name: "Niklaus Wirth", rooms: ["support"], device: "phone"})
      await people.grace.setStatus(mobile ? "away" : "busy")
      await waitFeed(page, "status", "grace")
      await visitor.leave()
      await waitFeed(page, "leave", "niklaus")
      await people.ada.setStatus("online")
      await waitRow(page, "ada", {status: "online"})
      await waitIn(page, "the chart drawn", () => !!document.querySelector("#chart canvas"))
      await sleep(500) // let the chart and the feed settle before the picture (not asserted)
      await noOverflow(page, "main")
      await shot(page, `${label}-main`)
      await shot(page, `${label}-main-full`, {fullPage: true})
    })
    await check(`${label}: a room's detail fits`, async () => {
      const room = page.locator(roomSel("lobby")).first()
      await room.scrollIntoViewIfNeeded()
      await room.click()
      await page.locator("#room-detail").waitFor({state: "visible", timeout: WAIT})
      await waitIn(page, "members in #room-detail", () => document.querySelectorAll("#room-detail .member-row").length >= 2)
      await sleep(300) // a drawer's slide-in animation, for the picture only
      await noOverflow(page, "room detail")
      await shot(page, `${label}-room`)
    })
    await step(`${label}: no uncaught error in the page`, async () => pageErrorsFree(page))
  }
}

// (f) Members and viewers: their own account only, no account picker, no owner actions.
SCENARIOS.roles = async () => {
  await launch()
  await connectUser("alice", {name: "Alice Liddell", status: "online", rooms: ["lobby"], device: "laptop"})
  await connectUser("olga", {name: "Olga Other", status: "online", rooms: ["lobby"],
    secret: env.DASH_OTHER_SECRET, acc: env.DASH_OTHER_ACCOUNT})
  const page0 = await openPage()
  await step("a wrong password is refused on the form, with a message", async () => {
    await page0.goto(`${BASE}/`)
    await page0.locator("#login-email").waitFor({state: "visible", timeout: WAIT})
    await page0.fill("#login-email", env.DASH_MEMBER_EMAIL)
    await page0.fill("#login-password", "not-the-password")
    await page0.click("#login-submit")
    await waitIn(page0, "#login-error text", () => (document.querySelector("#login-error")?.textContent || "").trim().length > 0)
    assert(!(await visible(page0, "#app")), "#app is visible after a failed login")
  })
  for(const [role, email] of [["member", env.DASH_MEMBER_EMAIL], ["viewer", env.DASH_VIEWER_EMAIL]]){
    const page = await openPage()
    await step(`${role}: logs in straight to the account, live`, async () => {
      await login(page, email, env.DASH_PASSWORD)
      await waitLive(page)
    })
    await step(`${role}: sees the account's users and not another account's`, async () => {
      await waitRow(page, "alice", {status: "online", name: "Alice Liddell"})
      await waitNumber(page, "#online-users", 1)
      assertEq(await rowsShown(page), ["alice"], "rows")
    })
    await step(`${role}: no account picker`, async () => {
      assert(!(await visible(page, "#account-select")), "#account-select is visible")
    })
    await step(`${role}: no owner actions (rotate, usage, kick)`, async () => {
      assert(!(await visible(page, "#rotate-secret")), "#rotate-secret is visible")
      assert(!(await visible(page, "#usage")), "#usage is visible")
      await page.locator(rowSel("alice")).click()
      await sleep(300) // a detail that opens does so at once; none must offer a kick
      const kicks = await page.locator(".kick").evaluateAll(els => els.filter(e => e.offsetParent !== null).length)
      assertEq(kicks, 0, "visible .kick buttons")
    })
    await step(`${role}: no uncaught error in the page`, async () => pageErrorsFree(page))
  }
}

// Owner actions: usage, kick, rotate.
SCENARIOS.owner = async () => {
  await launch()
  const page = await openPage()
  const laptop = await connectUser("alice", {name: "Alice Liddell", rooms: ["lobby"], device: "laptop", reconnect: false})
  const phone = await connectUser("alice", {name: "Alice Liddell", rooms: ["lobby"], device: "phone", reconnect: false})
  await step("the owner logs in to the account: no picker, usage and rotate shown", async () => {
    await login(page, env.DASH_OWNER_EMAIL, env.DASH_PASSWORD)
    await waitLive(page)
    assert(!(await visible(page, "#account-select")), "#account-select is visible for an owner")
    await page.locator("#usage").waitFor({state: "visible", timeout: WAIT})
    await waitIn(page, "#usage-connections and #usage-messages filled", () =>
      /\d/.test(document.querySelector("#usage-connections")?.textContent || "") &&
      /\d/.test(document.querySelector("#usage-messages")?.textContent || ""))
    assert(await visible(page, "#rotate-secret"), "#rotate-secret is not visible")
  })
  await step("a user's detail lists one session per connection", async () => {
    await waitRow(page, "alice")
    await waitNumber(page, "#online-connections", 2)
    await page.locator(rowSel("alice")).click()
    await page.locator("#user-detail").waitFor({state: "visible", timeout: WAIT})
    await waitIn(page, "two .session in #user-detail", () => document.querySelectorAll("#user-detail .session").length === 2)
  })
  await check("kicking a session disconnects exactly that connection", async () => {
    await waitIn(page, "a .kick[data-session] button on each session", () =>
      document.querySelectorAll("#user-detail .session .kick[data-session]").length === 2)
    const kick = page.locator("#user-detail .kick[data-session]").first()
    const id = await kick.getAttribute("data-session")
    page.once("dialog", d => d.accept().catch(() => {})) // a confirm() is fine, too
    await kick.click()
    await until("one of alice's sockets closed by the server", () => laptop.closes + phone.closes >= 1)
    await waitNumber(page, "#online-connections", 1)
    await waitIn(page, "the kicked session gone from #user-detail", id =>
      !document.querySelector(`#user-detail .kick[data-session="${CSS.escape(id)}"]`) &&
      document.querySelectorAll("#user-detail .session").length === 1, id)
    await waitRow(page, "alice")
    assertEq(laptop.closes + phone.closes, 1, "sockets closed")
  })
  await step("rotating the secret asks for confirmation, then shows the new secret, which signs working tokens", async () => {
    const detailClose = page.locator("#user-detail-close")
    if(await detailClose.isVisible()){ await detailClose.click() }
    await page.locator("#rotate-secret").click()
    await page.locator("#rotate-confirm").waitFor({state: "visible", timeout: WAIT})
    assert(!(await visible(page, "#new-secret")), "#new-secret shown before confirming")
    await page.locator("#rotate-confirm").click()
    await page.locator("#new-secret").waitFor({state: "visible", timeout: WAIT})
    const secret = await until("#new-secret filled", async () => {
      const v = await page.locator("#new-secret").evaluate(e => ("value" in e && e.value) || e.textContent)
      return (v || "").trim()
    })
    assert(secret !== SECRET, "the new secret equals the old one")
    const eve = await connectUser("eve", {name: "Eve New", rooms: ["lobby"], secret})
    await waitRow(page, "eve", {name: "Eve New"})
    await eve.leave()
  })
  await step("no uncaught error in the page", async () => pageErrorsFree(page))
}

// (d) The node goes away and comes back.
SCENARIOS.reconnect = async () => {
  await launch()
  const page = await openPage()
  await step("the admin is live on the account", () => loginAdminTo(page))
  const alice = await connectUser("alice", {name: "Alice Liddell", rooms: ["lobby"], device: "laptop"})
  const bob = await connectUser("bob", {name: "Bob Stone", status: "busy", rooms: ["lobby"], device: "laptop"})
  await step("alice and bob are listed", async () => {
    await waitRow(page, "alice", {status: "online"})
    await waitRow(page, "bob", {status: "busy"})
  })
  await sleep(500) // let a snapshot (every 200 ms) record them: what a restart restores
  await ctrl("stop")
  await step("with the node gone, #conn-state says reconnecting", async () => {
    await waitIn(page, "#conn-state reconnecting", () => document.querySelector("#conn-state")?.dataset.state === "reconnecting")
  })
  bob.socket.disconnect() // bob does not come back
  await ctrl("start")
  await step("with the node back, #conn-state is live again", () => waitLive(page, 30000))
  await step("the list is right again: alice (reconnected) is there, bob (gone) is not", async () => {
    await until("alice's socket to reconnect", () => alice.opens >= 2, 30000)
    await waitRow(page, "alice", {status: "online"})
    await waitNoRow(page, "bob", 15000)
    await waitNumber(page, "#online-users", 1)
  })
  await step("live updates flow again: a new join and a status change show", async () => {
    const carol = await connectUser("carol", {name: "Carol Ng", rooms: ["support"]})
    await waitRow(page, "carol", {status: "online"})
    await alice.setStatus("away")
    await waitRow(page, "alice", {status: "away"})
    await carol.leave()
    await waitNoRow(page, "carol")
  })
  await step("no uncaught error in the page", async () => pageErrorsFree(page))
}

// (e) Access tokens that live 2 s.
SCENARIOS.expiry = async () => {
  const ttl = Number(env.DASH_ACCESS_TTL_S || 2)
  await launch()
  const page = await openPage()
  const loggedInAt = Date.now()
  await step("the admin is live on the account", () => loginAdminTo(page))
  const alice = await connectUser("alice", {name: "Alice Liddell", rooms: ["lobby"]})
  await step("alice is listed", () => waitRow(page, "alice", {status: "online"}))
  // The first access token is dead after `ttl` s; wait well past it (a precondition, not a check).
  await sleep(Math.max(0, loggedInAt + (ttl + 3) * 1000 - Date.now()))
  await step(`after ${ttl + 3} s, presence changes still show`, async () => {
    await alice.setStatus("busy")
    await waitRow(page, "alice", {status: "busy"})
    const bob = await connectUser("bob", {name: "Bob Stone", rooms: ["lobby"]})
    await waitRow(page, "bob", {status: "online"})
    await bob.leave()
    await waitNoRow(page, "bob")
  })
  await step("API calls still succeed (changing the chart range reloads the history)", async () => {
    const current = await page.locator("#range-select").inputValue()
    const other = await page.evaluate(c => [...document.querySelectorAll("#range-select option")].map(o => o.value).find(v => v !== c), current)
    const since = Date.now()
    await page.selectOption("#range-select", other)
    await until("a successful API call after the change", () =>
      page.log.api.some(r => r.at >= since && r.status === 200 && !r.path.startsWith("/api/v1/auth/")))
    const bad = page.log.api.filter(r => r.at >= since && r.status >= 400)
    assertEq(bad, [], "failed API calls after the range change")
    assert(await visible(page, "#app"), "#app hidden: logged out")
    assert(!(await visible(page, "#login")), "the login form came back")
    note(`API responses so far: ${show(page.log.api.map(r => `${r.status} ${r.path}`), 600)}`)
  })
  await step("a reload resumes the session without a login", async () => {
    await page.reload()
    await page.locator("#app").waitFor({state: "visible", timeout: WAIT})
    if(await visible(page, "#account-select")){
      await page.selectOption("#account-select", ACCOUNT)
    }
    await waitLive(page)
    await waitRow(page, "alice", {status: "busy"})
  })
  await sleep((ttl + 1) * 1000) // the resumed session's token expires too
  await ctrl("stop")
  await step("the node goes away: reconnecting", () =>
    waitIn(page, "#conn-state reconnecting", () => document.querySelector("#conn-state")?.dataset.state === "reconnecting"))
  await ctrl("start")
  await step("the node comes back: the socket rejoins with a fresh token, live, alice listed", async () => {
    await waitLive(page, 30000)
    await waitRow(page, "alice", {status: "busy"}, 15000)
    const carol = await connectUser("carol", {name: "Carol Ng", rooms: ["lobby"]})
    await waitRow(page, "carol", {status: "online"})
  })
  await step("no uncaught error in the page", async () => pageErrorsFree(page))
}

// ---------------------------------------------------------------------------------------------

async function main(){
  if(!SCENARIOS[scenario] || !BASE){
    console.log(`not ok - usage: node dashboard.mjs <${Object.keys(SCENARIOS).join("|")}> <base url>`)
    console.log("0 passed, 1 failed")
    process.exit(2)
  }
  const cap = setTimeout(() => {
    console.log(`not ok - scenario ${scenario}: still running after ${env.DASH_SCENARIO_TIMEOUT_MS || 180000} ms`)
    console.log(`${passed} passed, ${failed + 1} failed`)
    process.exit(1)
  }, Number(env.DASH_SCENARIO_TIMEOUT_MS || 180000))
  try {
    await SCENARIOS[scenario]()
  } catch(e){
    if(!(e instanceof Abort)){
      failed++
      console.log(`not ok - scenario ${scenario}: ${String(e && e.stack || e).split("\n").slice(0, 6).join(" | ")}`)
    }
  }
  clearTimeout(cap)
  for(const c of cleanups.reverse()){ try { await c() } catch {} }
  stdinLines.close()
  console.log(`${passed} passed, ${failed} failed`)
  process.exit(failed === 0 && passed > 0 ? 0 : 1)
}

main()
