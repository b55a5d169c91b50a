#!/usr/bin/env node
// Dashboard benchmark (not a test): how the live dashboard copes with a big account.
//
//   node tests/js/dashboard_bench.mjs <base url> <admin password> [users = 10000]
//
// against a running release node, e.g.
//   PRESENCED__BOOTSTRAP__ADMIN_PASSWORD=admin-pass-123 ./target/release/presenced &
//   node tests/js/dashboard_bench.mjs http://127.0.0.1:4000 admin-pass-123 10000
//
// 1. Creates an account (plan enterprise) and an owner for it (admin: ADMIN_EMAIL, default
//    admin@localhost).
// 2. Connects <users> end users to it, each joined to one of ROOMS rooms with a status and a
//    device, from WORKERS child processes (the per-process fd limit here is 20 000), at RATE
//    connections per second in all (default 400: under the default per-IP connect limit of 500/s),
//    spread over source addresses 127.0.0.2… Every socket heartbeats every 25 s.
// 3. In headless Chromium (CHROMIUM, default /usr/bin/chromium), LOADS times (default 3, each a
//    fresh context): time from navigation to the list rendered (#online-users shows <users> and
//    the first .user-row exists), and from the login click to the same.
// 4. JOINS times (default 50): types a new user's id into #user-search, then opens that user's
//    socket (which joins a room at once) and times until its .user-row exists. Both clocks are
//    this machine's wall clock (performance.timeOrigin + performance.now() on both sides).
// Prints the figures (p50/p90/max) and one JSON line.

import {fork} from "node:child_process"
import crypto from "node:crypto"
import os from "node:os"
import {performance} from "node:perf_hooks"
import {fileURLToPath} from "node:url"

import WebSocket from "ws"

const env = process.env
const now = () => performance.timeOrigin + performance.now()
const sleep = ms => new Promise(r => setTimeout(r, ms))
const b64 = o => Buffer.from(JSON.stringify(o)).toString("base64url")
function token(sub, acc, secret, name){
  const h = b64({alg: "HS256", typ: "JWT"})
  const p = b64({sub, acc, name, exp: Math.floor(Date.now() / 1000) + 24 * 3600})
  return `${h}.${p}.${crypto.createHmac("sha256", secret).update(`${h}.${p}`).digest("base64url")}`
}
const STATUSES = ["online", "online", "online", "away", "busy"]
const DEVICES = ["laptop", "phone", "desktop", "tablet"]

/** Opens one end user's socket and joins `room`; resolves with the socket once the join is ok. */
function openUser({wsUrl, acc, secret, sub, name, room, status, device, localAddress}){
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${wsUrl}?vsn=2.0.0&token=${token(sub, acc, secret, name)}`,
      {localAddress, perMessageDeflate: false})
    const fail = e => { ws.terminate(); reject(e) }
    ws.on("error", fail)
    ws.on("open", () => ws.send(JSON.stringify(["1", "1", room, "phx_join", {status, meta: {device}}])))
    ws.on("message", data => {
      const m = JSON.parse(data)
      if(m[3] === "phx_reply" && m[1] === "1"){
        if(m[4].status === "ok"){ ws.off("error", fail); ws.on("error", () => {}); resolve(ws) }
        else { fail(new Error(`join refused: ${JSON.stringify(m[4])}`)) }
      }
    })
  })
}

// ---------------------------------------------------------------------------------------------
// Worker: holds its share of the sessions until the parent goes away.

async function worker(){
  const job = JSON.parse(env.BENCH_JOB)
  const socks = []
  let errors = 0
  const gap = 1000 / job.rate
  const t0 = now()
  const pending = []
  for(let i = job.from; i < job.to; i++){
    // Paced: connection k starts at t0 + k * gap.
    const due = t0 + (i - job.from) * gap
    const wait = due - now()
    if(wait > 1){ await sleep(wait) }
    pending.push(openUser({
      ...job, sub: `u${i}`, name: `User ${i}`, room: `room:r${i % job.rooms}`,
      status: STATUSES[i % STATUSES.length], device: DEVICES[i % DEVICES.length],
      localAddress: `127.0.0.${2 + (i % 40)}`,
    }).then(ws => { socks.push(ws); ws.on("message", () => {}) }, () => { errors++ }))
    if(pending.length >= 200){ await Promise.all(pending.splice(0)) ; process.send({kind: "progress", done: socks.length, errors}) }
  }
  await Promise.all(pending)
  process.send({kind: "ready", done: socks.length, errors})
  let ref = 100
  setInterval(() => {
    for(const ws of socks){ if(ws.readyState === 1){ ws.send(JSON.stringify([null, String(ref++), "phoenix", "heartbeat", {}])) } }
  }, 25000)
  process.on("disconnect", () => process.exit(0))
}

// ---------------------------------------------------------------------------------------------
// Parent

function pct(xs, p){
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(p / 100 * s.length) - 1))]
}
const ms = x => `${x.toFixed(1)} ms`

async function api(base, method, path, token, body){
  const res = await fetch(`${base}/api/v1${path}`, {
    method,
    headers: {...(token ? {authorization: `Bearer ${token}`} : {}), "content-type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  const json = await res.json().catch(() => null)
  if(!res.ok){ throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`) }
  return json
}

async function main(){
  const [baseArg, adminPassword, usersArg] = process.argv.slice(2)
  if(!baseArg || !adminPassword){
    console.error("usage: node tests/js/dashboard_bench.mjs <base url> <admin password> [users = 10000]")
    process.exit(2)
  }
  const base = baseArg.replace(/\/+$/, "")
  const wsUrl = base.replace(/^http/, "ws") + "/socket/websocket"
  const N = Number(usersArg || 10000)
  const WORKERS = Number(env.WORKERS || Math.max(1, Math.ceil(N / 15000)) + 1)
  const RATE = Number(env.RATE || 400)
  const ROOMS = Number(env.ROOMS || 100)
  const LOADS = Number(env.LOADS || 3)
  const JOINS = Number(env.JOINS || 50)
  const adminEmail = env.ADMIN_EMAIL || "admin@localhost"

  const {access_token: admin} = await api(base, "POST", "/auth/login", null, {email: adminEmail, password: adminPassword})
  const tag = Date.now().toString(36)
  const acc = await api(base, "POST", "/accounts", admin, {name: `Dashboard bench ${tag}`, plan: "enterprise"})
  const owner = {email: `bench-${tag}@bench.local`, password: `bench-password-${tag}`}
  await api(base, "POST", "/users", admin, {...owner, role: "owner", account_id: acc.id})
  console.log(`# account ${acc.id}; ${N} users from ${WORKERS} processes at ${RATE}/s into ${ROOMS} rooms`)

  // 2. the online users
  const t0 = now()
  const per = Math.ceil(N / WORKERS)
  const kids = []
  const state = []
  await new Promise((resolve, reject) => {
    for(let w = 0; w < WORKERS; w++){
      const from = w * per, to = Math.min(N, from + per)
      const job = {wsUrl, acc: acc.id, secret: acc.signing_secret, from, to, rate: RATE / WORKERS, rooms: ROOMS}
      const kid = fork(fileURLToPath(import.meta.url), ["--worker"], {env: {...env, BENCH_JOB: JSON.stringify(job)}})
      kids.push(kid)
      state[w] = {done: 0, errors: 0, ready: false}
      kid.on("message", m => {
        Object.assign(state[w], {done: m.done, errors: m.errors, ready: state[w].ready || m.kind === "ready"})
        if(state.every(s => s && s.ready)){ resolve() }
      })
      kid.on("exit", code => { if(!state[w].ready){ reject(new Error(`worker ${w} exited ${code}`)) } })
    }
    const tick = setInterval(() => {
      const done = state.reduce((a, s) => a + (s ? s.done : 0), 0)
      const errors = state.reduce((a, s) => a + (s ? s.errors : 0), 0)
      process.stderr.write(`\r# connected ${done}/${N}, errors ${errors}   `)
      if(state.every(s => s && s.ready)){ clearInterval(tick); process.stderr.write("\n") }
    }, 1000)
  })
  const connected = state.reduce((a, s) => a + s.done, 0)
  const errors = state.reduce((a, s) => a + s.errors, 0)
  console.log(`# ${connected} users online (${errors} errors) in ${((now() - t0) / 1000).toFixed(1)} s`)
  if(connected !== N){ throw new Error(`only ${connected} of ${N} users connected`) }
  await sleep(2000) // let the last diffs settle

  // 3. the list, LOADS times
  const {chromium} = await import("playwright-core")
  const browser = await chromium.launch({
    executablePath: env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  })
  const loads = []
  let page
  for(let k = 0; k < LOADS; k++){
    if(page){ await page.context().close() }
    const context = await browser.newContext({viewport: {width: 1440, height: 900}})
    page = await context.newPage()
    page.setDefaultTimeout(120000)
    const tNav = now()
    await page.goto(`${base}/`)
    await page.locator("#login-email").waitFor({state: "visible"})
    await page.fill("#login-email", owner.email)
    await page.fill("#login-password", owner.password)
    const tClick = now()
    await page.click("#login-submit")
    const handle = await page.waitForFunction(n => {
      const t = document.querySelector("#online-users")?.textContent || ""
      const shown = Number(t.replace(/[^0-9]/g, ""))
      return shown === n && document.querySelector("#users .user-row") ? performance.timeOrigin + performance.now() : false
    }, N, {polling: "raf", timeout: 120000})
    const tDone = await handle.jsonValue()
    const heap = await page.evaluate(() => performance.memory ? performance.memory.usedJSHeapSize : null)
    const rows = await page.locator("#users .user-row").count()
    loads.push({nav: tDone - tNav, click: tDone - tClick, heapMB: heap && heap / 1048576, rows})
    console.log(`# load ${k + 1}: navigation → list ${ms(tDone - tNav)}, login click → list ${ms(tDone - tClick)}, ${rows} rows in the DOM, JS heap ${heap ? (heap / 1048576).toFixed(1) + " MB" : "?"}`)
  }

  // 4. join → row, JOINS times
  const joins = []
  for(let i = 0; i < JOINS; i++){
    const sub = `probe-${tag}-${i}`
    await page.fill("#user-search", sub)
    await page.waitForFunction(() => document.querySelector("#users")?.dataset.count === "0", null, {polling: 20})
    await page.evaluate(sub => {
      window.__seen = new Promise(resolve => {
        const sel = `#users .user-row[data-user="${sub}"]`
        const check = () => document.querySelector(sel) && (resolve(performance.timeOrigin + performance.now()), true)
        if(check()){ return }
        const obs = new MutationObserver(() => { if(check()){ obs.disconnect() } })
        obs.observe(document.querySelector("#users"), {subtree: true, childList: true, attributes: true, attributeFilter: ["data-user"]})
      })
    }, sub)
    const tJoin = now()
    const ws = await openUser({wsUrl, acc: acc.id, secret: acc.signing_secret, sub, name: `Probe ${i}`,
      room: "room:probe", status: "online", device: "laptop", localAddress: "127.0.0.60"})
    const tSeen = await page.evaluate(() => window.__seen)
    joins.push(tSeen - tJoin)
    ws.close()
    await sleep(100)
  }
  console.log(`# join → row (n=${joins.length}): p50 ${ms(pct(joins, 50))}, p90 ${ms(pct(joins, 90))}, max ${ms(Math.max(...joins))}`)

  const cpu = os.cpus()[0]?.model || "?"
  const result = {
    users: N, workers: WORKERS, rate: RATE, rooms: ROOMS,
    machine: `${os.cpus().length} × ${cpu}, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB, ${os.platform()} ${os.release()}`,
    chromium: browser.version(),
    load_nav_ms: {p50: pct(loads.map(l => l.nav), 50), max: Math.max(...loads.map(l => l.nav))},
    load_click_ms: {p50: pct(loads.map(l => l.click), 50), max: Math.max(...loads.map(l => l.click))},
    join_to_row_ms: {n: joins.length, p50: pct(joins, 50), p90: pct(joins, 90), max: Math.max(...joins)},
    heap_mb: loads.at(-1).heapMB,
  }
  console.log(`users online ${N}: navigation → full list p50 ${ms(result.load_nav_ms.p50)} (max ${ms(result.load_nav_ms.max)}); ` +
    `login click → full list p50 ${ms(result.load_click_ms.p50)}; join → row p50 ${ms(result.join_to_row_ms.p50)}, p90 ${ms(result.join_to_row_ms.p90)}`)
  console.log(JSON.stringify(result))
  await browser.close()
  for(const k of kids){ k.disconnect() }
  process.exit(0)
}

if(process.argv.includes("--worker")){
  worker().catch(e => { console.error(e); process.exit(1) })
} else {
  main().catch(e => { console.error(`\nbench failed: ${e.stack || e}`); process.exit(1) })
}
