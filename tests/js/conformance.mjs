#!/usr/bin/env node
// Client-side conformance suite for presenced's Phoenix Channels V2 JSON endpoint.
//
// It drives the server with the official `phoenix` npm client (Socket, Channel, Presence) over
// the `ws` WebSocket implementation, plus a raw `ws` client for the wire-level checks that
// phoenix.js cannot express (malformed frames, silence, killed transports).
//
// Inputs come from the environment (see README.md); output is TAP-like:
//   ok - <name>  /  not ok - <name>: <why>  /  "# ..." diagnostics  /  last line "N passed, M failed".
// The exit code is 0 only when every check passed.

import crypto from "node:crypto"
import fs from "node:fs"
import http from "node:http"
import https from "node:https"
import {performance} from "node:perf_hooks"
import {isDeepStrictEqual} from "node:util"

import {Socket, Presence} from "phoenix"
import WebSocket from "ws"

// ---------------------------------------------------------------------------------------------
// Environment

const REQUIRED_ENV = [
  "PRESENCED_WS", "PRESENCED_HTTP", "PRESENCED_ACCOUNT", "PRESENCED_SECRET",
  "PRESENCED_GRACE_MS", "PRESENCED_TIMEOUT_MS", "PRESENCED_MAX_FRAME", "PRESENCED_MAX_JOINS",
  "PRESENCED_DASHBOARD_TOKEN",
]

function bail(why){
  console.log(`not ok - environment: ${why}`)
  console.log("0 passed, 1 failed")
  process.exit(2)
}

function readEnv(){
  const missing = REQUIRED_ENV.filter(k => !process.env[k])
  if(missing.length){ bail(`missing ${missing.join(", ")}`) }
  const int = (k, fallback) => {
    const raw = process.env[k]
    if(raw === undefined || raw === ""){ return fallback }
    const v = Number(raw)
    if(!Number.isInteger(v) || v <= 0){ bail(`${k} must be a positive integer, got ${JSON.stringify(raw)}`) }
    return v
  }
  const trim = s => s.replace(/\/+$/, "")
  return {
    WS: trim(process.env.PRESENCED_WS),
    HTTP: trim(process.env.PRESENCED_HTTP),
    ACCOUNT: process.env.PRESENCED_ACCOUNT,
    SECRET: process.env.PRESENCED_SECRET,
    GRACE: int("PRESENCED_GRACE_MS"),
    TIMEOUT: int("PRESENCED_TIMEOUT_MS"),
    MAX_FRAME: int("PRESENCED_MAX_FRAME"),
    MAX_JOINS: int("PRESENCED_MAX_JOINS"),
    DASHBOARD_TOKEN: process.env.PRESENCED_DASHBOARD_TOKEN,
    // optional
    MAX_META: int("PRESENCED_MAX_META", null),
    SUITE_MS: int("PRESENCED_SUITE_TIMEOUT_MS", 90000),
    ONLY: process.env.PRESENCED_ONLY ? new RegExp(process.env.PRESENCED_ONLY) : null,
    DEBUG: !!process.env.PRESENCED_DEBUG,
  }
}

const env = readEnv()
const {GRACE, TIMEOUT, MAX_FRAME, MAX_JOINS} = env
// phoenix.js heartbeat interval: well below the server's idle timeout (phoenix default is 30 s).
const HB_MS = Math.max(100, Math.min(30000, Math.floor(TIMEOUT / 3)))
const PUSH_TIMEOUT = 5000 // phoenix.js push/join timeout
const WAIT = 5000 // default bound for waiting on one expected event
const LATE = GRACE + 2000 // a grace-window leave must arrive by then (after the drop)
const EARLY = Math.floor(GRACE * 0.8) // ... and not before this
const IMMEDIATE = Math.max(150, EARLY) // an explicit leave must be seen faster than this
const AUTH_TOKEN_PREFIX = "base64url.bearer.phx." // phoenix/assets/js/phoenix/constants.js
const SUBPROTOCOL_RE = /^[!#$%&'*+\-.0-9A-Z^_`|a-z~]+$/ // what `ws` (and browsers) accept

// ---------------------------------------------------------------------------------------------
// Small utilities

const now = () => performance.now()
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
const sleepUntil = at => sleep(Math.max(0, at - now()))
const rand = (bytes = 4) => crypto.randomBytes(bytes).toString("hex")
const clone = v => (v === undefined ? undefined : JSON.parse(JSON.stringify(v)))
const ms = x => `${Math.round(x)} ms`
const has = (obj, key) => !!obj && typeof obj === "object" && Object.prototype.hasOwnProperty.call(obj, key)
const isObj = v => !!v && typeof v === "object" && !Array.isArray(v)

function show(v, max = 300){
  let s
  try { s = JSON.stringify(v) } catch { s = String(v) }
  if(s === undefined){ s = String(v) }
  return s.length > max ? `${s.slice(0, max)}…(${s.length} chars)` : s
}
const short = topic => (topic.length > 40 ? `${topic.slice(0, 37)}…` : topic)

class CheckError extends Error {}
class SkipCheck extends Error {}

function assert(cond, message){ if(!cond){ throw new CheckError(typeof message === "function" ? message() : message) } }
function assertEq(actual, expected, what){
  assert(isDeepStrictEqual(actual, expected), () => `${what}: expected ${show(expected)}, got ${show(actual)}`)
}
function assertReason(response, reason, what){
  const ok = Array.isArray(reason) ? isObj(response) && reason.includes(response.reason) : isObj(response) && response.reason === reason
  assert(ok, () => `${what}: expected error reason ${show(reason)}, got response ${show(response)}`)
}

function withTimeout(promise, limit, what){
  let timer
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new CheckError(what)), limit) }),
  ]).finally(() => clearTimeout(timer))
}

// Bounded wait for a condition (polled every 10 ms); resolves with the condition's truthy value.
async function until(cond, limit, what){
  const deadline = now() + limit
  for(;;){
    const v = cond()
    if(v){ return v }
    if(now() >= deadline){ throw new CheckError(`timed out after ${ms(limit)} waiting for ${typeof what === "function" ? what() : what}`) }
    await sleep(10)
  }
}

// Ordered, timestamped record of events with race-free waiting (events that arrived before the
// wait started are seen too; `from` skips the ones before a mark).
let SEQ = 0
class EventLog {
  constructor(){ this.items = []; this.waiters = new Set() }
  get mark(){ return this.items.length }
  push(item){
    item.at = now()
    item.seq = ++SEQ
    this.items.push(item)
    for(const w of this.waiters){ w() }
    return item
  }
  since(mark, pred = () => true){ return this.items.slice(mark).filter(pred) }
  waitFor(pred, limit, what, from = 0){
    return new Promise((resolve, reject) => {
      let idx = from
      let timer = null
      const done = () => { clearTimeout(timer); this.waiters.delete(check) }
      const check = () => {
        try {
          while(idx < this.items.length){
            const item = this.items[idx++]
            if(pred(item)){ done(); resolve(item); return }
          }
        } catch (e){ done(); reject(e) }
      }
      timer = setTimeout(() => {
        done()
        reject(new CheckError(`timed out after ${ms(limit)} waiting for ${typeof what === "function" ? what() : what}`))
      }, limit)
      this.waiters.add(check)
      check()
    })
  }
}

// ---------------------------------------------------------------------------------------------
// Tokens: HS256 JWT signed with the account's signing secret (raw UTF-8 bytes of the string).

const b64url = data => Buffer.from(data).toString("base64url") // no padding

function signJwt(claims, secret, alg = "HS256"){
  const input = `${b64url(JSON.stringify({alg, typ: "JWT"}))}.${b64url(JSON.stringify(claims))}`
  if(alg === "none"){ return `${input}.` }
  return `${input}.${crypto.createHmac("sha256", secret).update(input).digest("base64url")}`
}

function userClaims(sub, {name, meta, exp, acc = env.ACCOUNT} = {}){
  const iat = Math.floor(Date.now() / 1000)
  const claims = {sub, acc, iat, exp: exp ?? iat + 3600}
  if(name !== undefined){ claims.name = name }
  if(meta !== undefined){ claims.meta = meta }
  return claims
}

function userToken(sub, opts = {}){
  return signJwt(userClaims(sub, opts), opts.secret ?? env.SECRET, opts.alg ?? "HS256")
}

// What phoenix.js puts in Sec-WebSocket-Protocol for `authToken` (socket.js transportConnect):
// ["phoenix", "base64url.bearer.phx." + btoa(token) with "=" stripped]. Note: btoa is STANDARD
// base64 (not base64url) — for a JWT (alphabet [A-Za-z0-9._-]) it never yields "+" or "/".
const authSubprotocol = token => `${AUTH_TOKEN_PREFIX}${btoa(token).replace(/=/g, "")}`

const USER = tag => `u_${tag}_${rand(3)}`
const ROOM = tag => `room:cf_${tag}_${rand(4)}`

// ---------------------------------------------------------------------------------------------
// Per-check context: everything a check opens is closed when it ends.

class Ctx {
  constructor(name){
    this.name = name
    this.sockets = []
    this.raws = []
    this.trackers = []
    this.notes = []
    this.async = []
  }
  note(s){ this.notes.push(s) }
  skip(why){ throw new SkipCheck(why) }
  cleanup(){
    for(const s of this.sockets){ try { s.disconnect() } catch {} }
    for(const r of this.raws){ r.kill() }
  }
}

// ---------------------------------------------------------------------------------------------
// phoenix.js helpers

async function openSocket(ctx, {
  label = "socket", token, authToken, params = {}, expectOpen = true,
  reconnectAfterMs = () => 60000, heartbeatIntervalMs = HB_MS,
} = {}){
  const p = {...params}
  if(token !== undefined){ p.token = token }
  const socket = new Socket(env.WS, {
    params: p,
    authToken,
    transport: WebSocket,
    heartbeatIntervalMs,
    reconnectAfterMs,
    rejoinAfterMs: () => 60000, // a refused join must not be retried during a check
    timeout: PUSH_TIMEOUT,
    logger: env.DEBUG ? (kind, msg, data) => console.error(`# [${ctx.name} / ${label}] ${kind}: ${msg} ${show(data, 500)}`) : undefined,
  })
  ctx.sockets.push(socket)
  const ev = new EventLog()
  socket.onOpen(() => ev.push({kind: "open"}))
  socket.onError(e => ev.push({kind: "error", message: (e && (e.message || e.type)) || String(e)}))
  socket.onClose(e => ev.push({kind: "close", code: e && e.code, reason: e && e.reason !== undefined ? String(e.reason) : ""}))
  socket.onMessage(msg => ev.push({kind: "msg", msg}))
  socket.ev = ev
  socket.label = label
  socket.connect()
  if(expectOpen){
    const first = await ev.waitFor(e => e.kind !== "msg", WAIT, `${label} socket to open`)
    if(first.kind !== "open"){
      throw new CheckError(`${label} socket did not open: ${first.kind} ${first.message || first.code || ""}`.trim())
    }
  }
  return socket
}

function channelOf(socket, topic, payload = {}){
  const ch = socket.channel(topic, payload)
  ch.ev = new EventLog()
  ch.onError(reason => ch.ev.push({kind: "chan_error", reason: clone(reason)}))
  ch.onClose(() => ch.ev.push({kind: "chan_close"}))
  return ch
}

// Joins once (phoenix.js allows one join() per Channel) and resolves with {status, response}.
// Every later "ok" (a rejoin after a reconnect) is still recorded in ch.ev as "joined".
function joinReply(ch, limit = WAIT){
  return new Promise(resolve => {
    let settled = false
    const settle = (status, response) => {
      if(settled){ return }
      settled = true
      clearTimeout(timer)
      resolve({status, response})
    }
    const timer = setTimeout(() => settle("no_reply"), limit)
    ch.join(PUSH_TIMEOUT)
      .receive("ok", r => { ch.ev.push({kind: "joined", resp: clone(r)}); settle("ok", r) })
      .receive("error", r => { ch.ev.push({kind: "join_error", resp: clone(r)}); settle("error", r) })
      .receive("timeout", () => settle("timeout"))
  })
}

async function joinOk(ch){
  const r = await joinReply(ch)
  assert(r.status === "ok", () => `join ${short(ch.topic)}: expected ok, got ${r.status} ${show(r.response)}`)
  return r.response
}

async function joinError(ch, reason){
  const r = await joinReply(ch)
  assert(r.status === "error", () => `join ${short(ch.topic)}: expected an error reply, got ${r.status} ${show(r.response)}`)
  assertReason(r.response, reason, `join ${short(ch.topic)}`)
  return r.response
}

function pushReply(ch, event, payload, limit = WAIT){
  return new Promise(resolve => {
    let settled = false
    const settle = (status, response) => {
      if(settled){ return }
      settled = true
      clearTimeout(timer)
      resolve({status, response})
    }
    const timer = setTimeout(() => settle("no_reply"), limit)
    ch.push(event, payload, PUSH_TIMEOUT)
      .receive("ok", r => settle("ok", r))
      .receive("error", r => settle("error", r))
      .receive("timeout", () => settle("timeout"))
  })
}

async function pushOk(ch, event, payload){
  const r = await pushReply(ch, event, payload)
  assert(r.status === "ok", () => `push ${event} on ${short(ch.topic)}: expected ok, got ${r.status} ${show(r.response)}`)
  return r.response
}

function leaveReply(ch, limit = WAIT){
  return new Promise(resolve => {
    let settled = false
    const settle = status => {
      if(settled){ return }
      settled = true
      clearTimeout(timer)
      resolve(status)
    }
    const timer = setTimeout(() => settle("no_reply"), limit)
    ch.leave(PUSH_TIMEOUT)
      .receive("ok", () => settle("ok"))
      .receive("error", r => settle(`error ${show(r)}`))
      .receive("timeout", () => settle("timeout"))
  })
}

function listen(ch, event){
  ch.on(event, payload => ch.ev.push({kind: "event", event, payload: clone(payload)}))
}

// A phoenix.js Presence on a channel, with every state/diff/onJoin/onLeave/onSync recorded and
// every presence payload shape-checked (phoenix.js throws on a diff without joins/leaves).
function presenceMapErrors(map, where, roomMeta){
  const errs = []
  if(!isObj(map)){ return [`${where} is not an object: ${show(map)}`] }
  for(const [key, entry] of Object.entries(map)){
    if(!isObj(entry) || !Array.isArray(entry.metas) || entry.metas.length === 0){
      errs.push(`${where}["${key}"] has no non-empty metas array: ${show(entry)}`)
      continue
    }
    for(const m of entry.metas){
      if(!isObj(m) || typeof m.phx_ref !== "string" || m.phx_ref === ""){ errs.push(`${where}["${key}"] meta without a string phx_ref: ${show(m)}`) }
      else if(roomMeta && typeof m.online_at !== "number"){ errs.push(`${where}["${key}"] meta without a numeric online_at: ${show(m)}`) }
      else if(roomMeta && typeof m.status !== "string"){ errs.push(`${where}["${key}"] meta without a string status: ${show(m)}`) }
    }
  }
  return errs
}

function track(ctx, ch, label = "observer"){
  const tr = {label, ev: new EventLog(), shape: []}
  const roomMeta = ch.topic.startsWith("room:") // room metas carry status and online_at; any meta needs phx_ref
  // registered before Presence's own handlers, so a bad payload is reported before phoenix.js chokes on it
  ch.on("presence_state", st => { tr.shape.push(...presenceMapErrors(st, `${label}: presence_state`, roomMeta)) })
  ch.on("presence_diff", d => {
    if(!isObj(d) || !isObj(d.joins) || !isObj(d.leaves)){
      tr.shape.push(`${label}: presence_diff must have object "joins" and "leaves" (phoenix.js Presence needs both): ${show(d)}`)
      return
    }
    tr.shape.push(...presenceMapErrors(d.joins, `${label}: presence_diff.joins`, roomMeta), ...presenceMapErrors(d.leaves, `${label}: presence_diff.leaves`, roomMeta))
  })
  // The raw events are logged before Presence handles them, so a diff's own sync comes after it
  ch.on("presence_state", st => tr.ev.push({kind: "state", payload: clone(st)}))
  ch.on("presence_diff", d => tr.ev.push({kind: "diff", payload: clone(d)}))
  const presence = new Presence(ch)
  tr.presence = presence
  tr.users = () => Object.fromEntries(presence.list((id, p) => [id, clone(p.metas)]))
  tr.metasOf = id => tr.users()[id] || null
  presence.onJoin((key, cur, np) => tr.ev.push({kind: "onJoin", key, cur: clone(cur), np: clone(np)}))
  presence.onLeave((key, cur, lp) => tr.ev.push({kind: "onLeave", key, cur: clone(cur), lp: clone(lp)}))
  presence.onSync(() => tr.ev.push({kind: "sync", users: tr.users()}))
  ctx.trackers.push(tr)
  return tr
}

const mentions = (diff, user) => has(diff.joins, user) || has(diff.leaves, user)
const isDiffFor = user => e => e.kind === "diff" && isObj(e.payload) && mentions(e.payload, user)

// Every Presence sync since `mark` (and before the event with seq `beforeSeq`) listed `user`.
function assertAlwaysPresent(tr, user, mark, what, beforeSeq = Infinity){
  const gap = tr.ev.since(mark, e => e.kind === "sync" && e.seq < beforeSeq).find(e => !e.users[user])
  assert(!gap, () => `${what}: ${user} vanished from ${tr.label}'s Presence.list() at some sync: ${show(gap.users)}`)
}

// The diff swaps one meta of `user` for a new one: the new meta in joins (phx_ref_prev = oldRef,
// fresh phx_ref), the old meta in leaves — in the same diff. Returns the new meta.
function verifySwap(diff, user, oldRef, what){
  const j = diff.joins[user]
  const l = diff.leaves[user]
  assert(j, () => `${what}: the diff has no joins entry for ${user}: ${show(diff)}`)
  assert(l, () => `${what}: the diff has no leaves entry for ${user} (the old meta must leave in the same diff): ${show(diff)}`)
  assert(l.metas.some(m => m.phx_ref === oldRef), () => `${what}: leaves["${user}"] does not carry the old phx_ref ${oldRef}: ${show(l)}`)
  const nm = j.metas.find(m => m.phx_ref_prev === oldRef)
  assert(nm, () => `${what}: joins["${user}"] has no meta with phx_ref_prev = ${show(oldRef)}: ${show(j)}`)
  assert(nm.phx_ref !== oldRef, () => `${what}: the new meta reuses phx_ref ${oldRef}; phoenix.js Presence would then drop it together with the leave`)
  return nm
}

async function provePhoenixUsable(s, what){
  const ch = channelOf(s, ROOM("usable"), {status: "online"})
  const r = await joinReply(ch)
  assert(r.status === "ok", () => `socket not usable after ${what}: a follow-up join got ${r.status} ${show(r.response)}`)
  const l = await leaveReply(ch)
  assert(l === "ok", () => `socket not usable after ${what}: leaving the follow-up room got ${l}`)
  assert(s.isConnected(), `socket disconnected after ${what}`)
}

// ---------------------------------------------------------------------------------------------
// Raw `ws` client speaking V2 JSON frames by hand.

class Raw {
  constructor(ctx, url, {protocols, autoPong = true, heartbeat = true, label = "raw"} = {}){
    this.label = label
    this.ev = new EventLog()
    this.n = 0
    this.closed = null
    this.lastSent = null
    this.ws = new WebSocket(url, protocols, {autoPong, handshakeTimeout: WAIT})
    this.ws.on("open", () => this.ev.push({kind: "open"}))
    this.ws.on("message", (data, isBinary) => {
      const text = isBinary ? null : data.toString("utf8")
      let frame = null
      if(text !== null){ try { frame = JSON.parse(text) } catch {} }
      this.ev.push({kind: "frame", frame, text, binary: isBinary})
    })
    this.ws.on("error", e => this.ev.push({kind: "error", message: e.message}))
    this.ws.on("close", (code, reason) => {
      clearInterval(this.hb)
      this.closed = {code, reason: reason.toString(), at: now()}
      this.ev.push({kind: "close", code, reason: this.closed.reason})
    })
    if(heartbeat){
      this.hb = setInterval(() => {
        if(this.ws.readyState === WebSocket.OPEN){ this.send([null, `bg${++this.n}`, "phoenix", "heartbeat", {}]) }
      }, HB_MS)
    }
    ctx.raws.push(this)
  }

  static async open(ctx, {token, path = "/websocket", ...opts} = {}){
    const q = token === undefined ? "" : `&token=${encodeURIComponent(token)}`
    const r = new Raw(ctx, `${opts.base ?? env.WS}${path}?vsn=2.0.0${q}`, opts)
    const first = await r.ev.waitFor(e => e.kind !== "frame", WAIT, `${r.label} websocket to open`)
    if(first.kind !== "open"){ throw new CheckError(`${r.label}: websocket did not open: ${first.kind} ${first.message || first.code || ""}`) }
    return r
  }

  ref(prefix = "r"){ return `${prefix}${++this.n}` }
  send(frame){ this.sendRaw(JSON.stringify(frame)) }
  sendRaw(data, opts){ this.lastSent = now(); this.ws.send(data, opts) }

  // Sends one frame and waits for the phx_reply carrying its ref.
  async request(joinRef, topic, event, payload, {ref = this.ref(), limit = WAIT} = {}){
    const mark = this.ev.mark
    this.send([joinRef, ref, topic, event, payload])
    const e = await this.ev.waitFor(
      e => e.kind === "close" || (e.kind === "frame" && Array.isArray(e.frame) && e.frame[1] === ref && e.frame[3] === "phx_reply"),
      limit, `${this.label}: phx_reply to ${event} on ${short(topic)} (ref ${ref})`, mark)
    if(e.kind === "close"){ throw new CheckError(`${this.label}: socket closed (${e.code} ${e.reason}) while waiting for the reply to ${event} on ${short(topic)}`) }
    const p = e.frame[4]
    return {ref, frame: e.frame, item: e, status: isObj(p) ? p.status : undefined, response: isObj(p) ? p.response : undefined}
  }

  async join(topic, payload = {}){
    const joinRef = this.ref("j")
    const r = await this.request(joinRef, topic, "phx_join", payload, {ref: joinRef})
    return {...r, joinRef}
  }

  async joinOk(topic, payload = {}){
    const r = await this.join(topic, payload)
    assert(r.status === "ok", () => `${this.label}: join ${short(topic)}: expected ok, got ${show(r.frame)}`)
    return r
  }

  async heartbeatOk(what = "heartbeat"){
    const r = await this.request(null, "phoenix", "heartbeat", {})
    assert(r.status === "ok", () => `${this.label}: ${what}: heartbeat reply was ${show(r.frame)}`)
    return r
  }

  // The next phx_reply with status error after `mark` (an unsolicited error reply to a bad frame).
  errorReply(mark, what){
    return this.ev.waitFor(
      e => e.kind === "close" || (e.kind === "frame" && Array.isArray(e.frame) && e.frame[3] === "phx_reply" && isObj(e.frame[4]) && e.frame[4].status === "error"),
      WAIT, `${this.label}: error phx_reply to ${what}`, mark)
      .then(e => {
        if(e.kind === "close"){ throw new CheckError(`${this.label}: socket closed (${e.code} ${e.reason}) after ${what}; it must stay open`) }
        return e.frame
      })
  }

  waitClose(limit, what){ return this.ev.waitFor(e => e.kind === "close", limit, what) }
  kill(){ clearInterval(this.hb); try { this.ws.terminate() } catch {} }
}

async function proveRawUsable(r, what){
  assert(!r.closed, () => `${r.label}: socket closed after ${what} (${show(r.closed)})`)
  await r.heartbeatOk(`after ${what}`)
  await r.joinOk(ROOM("rawusable"), {status: "online"})
}

// A plain HTTP upgrade request; resolves with the (non-101) response, status 101 if accepted.
function rawUpgrade(path, query){
  const url = new URL(`${env.HTTP}${path}?${new URLSearchParams(query)}`)
  const lib = url.protocol === "https:" ? https : http
  return new Promise((resolve, reject) => {
    const req = lib.request(url, {
      method: "GET",
      timeout: WAIT,
      headers: {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": crypto.randomBytes(16).toString("base64"),
      },
    })
    req.on("upgrade", (res, socket) => { socket.destroy(); resolve({status: res.statusCode, headers: res.headers, body: ""}) })
    req.on("response", res => {
      const chunks = []
      res.on("data", c => chunks.push(c))
      res.on("end", () => resolve({status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks).toString("utf8")}))
      res.on("error", reject)
    })
    req.on("timeout", () => req.destroy(new Error(`no response within ${WAIT} ms`)))
    req.on("error", reject)
    req.end()
  })
}

function badTokens(){
  const u = USER("bad")
  const iat = Math.floor(Date.now() / 1000)
  return [
    ["no token", undefined],
    ["garbage token", "bad"],
    ["wrong signature", userToken(u, {secret: `${env.SECRET}-wrong`})],
    ["expired", userToken(u, {exp: iat - 600})],
    ["alg none", signJwt(userClaims(u), null, "none")],
    ["unknown account", userToken(u, {acc: `acc_conformance_${rand()}`})],
  ]
}

// =============================================================================================
// The checks

const checks = []
const check = (name, fn, timeoutMs = 20000) => checks.push({name, fn, timeoutMs})

// ---- authentication -------------------------------------------------------------------------

check("auth: upgrade without a valid token is refused with 401/403 and a JSON {error, message} body", async ctx => {
  for(const path of ["/socket/websocket", "/api/v1/realtime/websocket"]){
    for(const [label, token] of badTokens()){
      const query = {vsn: "2.0.0"}
      if(token !== undefined){ query.token = token }
      const r = await rawUpgrade(path, query)
      const what = `${path} with ${label}`
      assert(r.status === 401 || r.status === 403, () => `${what}: expected HTTP 401 or 403, got ${r.status}`)
      assert(/json/i.test(r.headers["content-type"] || ""), () => `${what}: content-type is ${show(r.headers["content-type"])}, expected JSON`)
      let body
      try { body = JSON.parse(r.body) } catch { throw new CheckError(`${what}: body is not JSON: ${show(r.body)}`) }
      assert(isObj(body) && typeof body.error === "string" && body.error !== "", () => `${what}: body has no string "error": ${show(body)}`)
      assert(typeof body.message === "string", () => `${what}: body has no string "message": ${show(body)}`)
      if(path === "/socket/websocket"){ ctx.note(`${label}: ${r.status} ${body.error}`) }
    }
  }
})

check("auth: phoenix.js socket with a bad token gets onError (401/403) and its channel never joins", async ctx => {
  const u = USER("badpx")
  const variants = [
    ["params token with wrong signature", {token: userToken(u, {secret: `${env.SECRET}-wrong`})}],
    ["authToken (subprotocol) that expired", {authToken: userToken(u, {exp: Math.floor(Date.now() / 1000) - 600})}],
  ]
  for(const [label, opts] of variants){
    const s = await openSocket(ctx, {label, ...opts, expectOpen: false})
    const ch = channelOf(s, ROOM("badtoken"))
    let joined = false
    ch.join(PUSH_TIMEOUT).receive("ok", () => { joined = true })
    const first = await s.ev.waitFor(e => e.kind === "error" || e.kind === "open", WAIT, `${label}: socket onError`)
    assert(first.kind === "error", `${label}: the socket opened although the token is bad`)
    assert(/\b40[13]\b/.test(first.message), () => `${label}: onError does not report a 401/403 upgrade refusal: ${show(first.message)}`)
    await sleep(500) // absence check: nothing may join
    assert(!joined, `${label}: the channel joined`)
    assert(!s.isConnected(), `${label}: the socket is connected`)
    assert(!s.ev.items.some(e => e.kind === "open"), `${label}: the socket opened`)
    s.disconnect()
  }
})

check("auth: token as phoenix.js params joins a room; meta has status, online_at (unix ms), phx_ref, token name, merged token+join meta (join wins)", async ctx => {
  const u = USER("meta")
  const room = ROOM("meta")
  const s = await openSocket(ctx, {token: userToken(u, {name: "Ada Conformance", meta: {team: "blue", color: "red"}})})
  const ch = channelOf(s, room, {status: "busy", meta: {color: "green", device: "laptop"}})
  const tr = track(ctx, ch, "self")
  const before = Date.now()
  await joinOk(ch)
  const st = await tr.ev.waitFor(e => e.kind === "state", WAIT, "presence_state after the join reply")
  const joined = ch.ev.items.find(e => e.kind === "joined")
  assert(joined.seq < st.seq, "presence_state arrived before the join reply")
  const metas = await until(() => tr.metasOf(u), WAIT, () => `${u} in Presence.list(): ${show(tr.users())}`)
  assert(metas.length === 1, () => `expected one meta for ${u}, got ${show(metas)}`)
  const m = metas[0]
  assertEq(m.status, "busy", "meta.status")
  assert(Number.isInteger(m.online_at) && m.online_at >= before - 30000 && m.online_at <= Date.now() + 30000,
    () => `meta.online_at must be unix milliseconds close to now (${before}), got ${show(m.online_at)}`)
  assertEq(m.name, "Ada Conformance", "meta.name (token claim name)")
  assertEq(m.team, "blue", "meta.team (from the token's meta claim)")
  assertEq(m.color, "green", "meta.color (join meta must win over token meta)")
  assertEq(m.device, "laptop", "meta.device (from the join meta)")
})

check("auth: token via phoenix.js authToken (Sec-WebSocket-Protocol) joins a room; server selects subprotocol \"phoenix\"", async ctx => {
  const u = USER("sub")
  const token = userToken(u, {name: "Sub Protocol"})
  assert(SUBPROTOCOL_RE.test(authSubprotocol(token)), "internal: minted token does not make a valid subprotocol")
  const s = await openSocket(ctx, {authToken: token})
  assertEq(s.conn && s.conn.protocol, "phoenix", "subprotocol selected by the server")
  assert(!s.endPointURL().includes("token="), "internal: token leaked into the URL")
  const ch = channelOf(s, ROOM("authtoken"), {status: "online"})
  const tr = track(ctx, ch, "self")
  await joinOk(ch)
  const metas = await until(() => tr.metasOf(u), WAIT, () => `${u} in Presence.list(): ${show(tr.users())}`)
  assertEq(metas[0].name, "Sub Protocol", "meta.name")
})

check("endpoint: /api/v1/realtime/websocket alias accepts a valid token and speaks the same protocol", async ctx => {
  const base = `${env.HTTP.replace(/^http/, "ws")}/api/v1/realtime`
  const r = await Raw.open(ctx, {token: userToken(USER("alias")), base, label: "alias"})
  await r.heartbeatOk("alias heartbeat")
  await r.joinOk(ROOM("alias"), {status: "online"})
})

// ---- wire format ----------------------------------------------------------------------------

check("protocol: raw V2 frames — heartbeat reply, join reply echoes join_ref/ref/topic, presence_state follows, status/leave replies", async ctx => {
  const u = USER("raw")
  const room = ROOM("raw")
  const r = await Raw.open(ctx, {token: userToken(u)})

  const hb = await r.request(null, "phoenix", "heartbeat", {}, {ref: "hb-1"})
  assertEq(hb.frame.slice(0, 4), [null, "hb-1", "phoenix", "phx_reply"], "heartbeat reply header")
  assertEq(hb.status, "ok", "heartbeat reply status")

  const j = await r.join(room, {status: "online"})
  assertEq(j.frame.slice(0, 4), [j.joinRef, j.joinRef, room, "phx_reply"], "join reply header [join_ref, ref, topic, event]")
  assertEq(j.status, "ok", "join reply status")
  assert(isObj(j.response), () => `join reply response must be an object: ${show(j.frame)}`)

  const st = await r.ev.waitFor(e => e.kind === "frame" && Array.isArray(e.frame) && e.frame[2] === room && e.frame[3] === "presence_state", WAIT, "presence_state frame")
  assert(st.seq > j.item.seq, "presence_state came before the join reply")
  assert(isObj(st.frame[4]), () => `presence_state payload must be an object: ${show(st.frame)}`)

  const mark = r.ev.mark
  const sr = await r.request(j.joinRef, room, "status", {status: "away"})
  assertEq(sr.frame.slice(0, 4), [j.joinRef, sr.ref, room, "phx_reply"], "status reply header")
  assertEq(sr.status, "ok", "status reply status")
  const diff = await r.ev.waitFor(e => e.kind === "frame" && Array.isArray(e.frame) && e.frame[2] === room && e.frame[3] === "presence_diff" &&
    isObj(e.frame[4]) && isObj(e.frame[4].joins) && has(e.frame[4].joins, u), WAIT, `presence_diff with ${u} in joins`, mark)
  assert(diff.frame[4].joins[u].metas.some(m => m.status === "away"), () => `diff does not carry status away: ${show(diff.frame)}`)

  const lv = await r.request(j.joinRef, room, "phx_leave", {})
  assertEq(lv.status, "ok", "phx_leave reply status")

  // every frame is a 5-array; anything for this topic carries our join_ref or null (phoenix.js
  // Channel.isMember drops messages whose join_ref is set but differs from the current join)
  for(const e of r.ev.items.filter(e => e.kind === "frame")){
    assert(Array.isArray(e.frame) && e.frame.length === 5, () => `frame is not a 5-element JSON array: ${show(e.text)}`)
    assert(typeof e.frame[2] === "string" && typeof e.frame[3] === "string", () => `frame topic/event not strings: ${show(e.frame)}`)
    if(e.frame[2] === room){ assert(e.frame[0] === null || e.frame[0] === j.joinRef, () => `frame on ${room} has join_ref ${show(e.frame[0])}, expected ${j.joinRef} or null`) }
  }

  // diagnostic only: what a phx_leave on a topic never joined gets (phoenix.js sends one after a join timeout)
  try {
    const stray = await r.request("j-stray", ROOM("neverjoined"), "phx_leave", {}, {limit: 1000})
    ctx.note(`phx_leave on a topic never joined -> ${show(stray.frame[4])} (Phoenix itself replies ok)`)
  } catch (e){
    ctx.note(`phx_leave on a topic never joined -> ${e.message}`)
  }
})

// ---- room presence --------------------------------------------------------------------------

check("room: a second member's join reaches the first as presence_diff; both see each other in Presence.list()", async ctx => {
  const room = ROOM("two")
  const a = USER("a")
  const b = USER("b")
  const sa = await openSocket(ctx, {label: "a", token: userToken(a)})
  const ca = channelOf(sa, room, {status: "online"})
  const ta = track(ctx, ca, "a")
  await joinOk(ca)
  await until(() => ta.metasOf(a), WAIT, () => `a sees itself: ${show(ta.users())}`)
  const mark = ta.ev.mark

  const sb = await openSocket(ctx, {label: "b", token: userToken(b)})
  const cb = channelOf(sb, room, {}) // no status: the default applies
  const tb = track(ctx, cb, "b")
  await joinOk(cb)
  const d = await ta.ev.waitFor(isDiffFor(b), WAIT, `a: presence_diff with ${b}`, mark)
  assert(has(d.payload.joins, b) && !has(d.payload.leaves, b), () => `b's arrival must be a join-only diff: ${show(d.payload)}`)
  assertEq(d.payload.joins[b].metas.length, 1, "metas of b in the join diff")
  assertEq(d.payload.joins[b].metas[0].status, "online", "default status when the join has none")
  await until(() => tb.metasOf(a) && tb.metasOf(b), WAIT, () => `b sees a and b: ${show(tb.users())}`)
  assert(tb.ev.items.some(e => e.kind === "state" && has(e.payload, a)), "b's presence_state does not contain a")
  assert(ta.metasOf(b), "a's Presence.list() lacks b")
})

check("room: a burst of joins sent at once (which the room may batch into fewer diffs) converges in every member's Presence.list(), and no onJoin repeats a meta the member already had", async ctx => {
  const room = ROOM("burst")
  const n = 60
  const users = Array.from({length: n + 1}, (_, i) => USER(`b${i}`))
  const [first, ...rest] = users
  const s0 = await openSocket(ctx, {label: "first", token: userToken(first)})
  const c0 = channelOf(s0, room, {status: "online"})
  const trackers = [track(ctx, c0, "first")]
  await joinOk(c0)
  const sockets = await Promise.all(rest.map(u => openSocket(ctx, {label: u, token: userToken(u)})))
  const channels = sockets.map(s => channelOf(s, room, {status: "online"}))
  trackers.push(...channels.map((c, i) => track(ctx, c, rest[i])))
  await Promise.all(channels.map(joinOk))
  await until(() => trackers.every(t => Object.keys(t.users()).length === n + 1), WAIT,
    () => `every member lists all ${n + 1}: ${trackers.map(t => Object.keys(t.users()).length).join(",")}`)
  for(const t of trackers){
    const again = t.ev.items.find(e => e.kind === "onJoin" && e.cur &&
      e.np.metas.some(m => e.cur.metas.some(c => c.phx_ref === m.phx_ref)))
    assert(!again, () => `${t.label}: onJoin of a meta it already had: ${show(again)}`)
    for(const u of users){ assertEq(t.metasOf(u).length, 1, `${t.label}: metas of ${u}`) }
  }
})

check("room: status push replies ok; ONE diff with the new meta (phx_ref_prev) in joins and the old in leaves; user never leaves list()", async ctx => {
  const room = ROOM("status")
  const a = USER("obs")
  const b = USER("st")
  const sa = await openSocket(ctx, {label: "observer", token: userToken(a)})
  const ca = channelOf(sa, room)
  const ta = track(ctx, ca)
  await joinOk(ca)
  const sb = await openSocket(ctx, {label: "b", token: userToken(b, {name: "Bea"})})
  const cb = channelOf(sb, room, {status: "online", meta: {device: "laptop"}})
  await joinOk(cb)
  const m0 = await until(() => ta.metasOf(b), WAIT, () => `b in observer's list: ${show(ta.users())}`)
  assertEq(m0.length, 1, "metas of b before the update")
  const mark = ta.ev.mark

  await pushOk(cb, "status", {status: "away", meta: {activity: "reading"}})
  const d1 = await ta.ev.waitFor(isDiffFor(b), WAIT, "diff for b's first status change", mark)
  const n1 = verifySwap(d1.payload, b, m0[0].phx_ref, "status away")
  assertEq(n1.status, "away", "new meta status")
  assertEq(n1.activity, "reading", "new meta activity (from the status push's meta)")
  const oj = ta.ev.since(mark, e => e.kind === "onJoin" && e.key === b)
  assert(oj.length > 0 && oj[0].cur, "Presence onJoin for b had no current presence: the client saw a new join, not an update")
  await until(() => { const m = ta.metasOf(b); return m && m.length === 1 && m[0].status === "away" }, WAIT,
    () => `observer list shows b with one meta, status away: ${show(ta.metasOf(b))}`)

  const mark2 = ta.ev.mark
  await pushOk(cb, "status", {status: "in_a_meeting"}) // custom status, no meta
  const d2 = await ta.ev.waitFor(isDiffFor(b), WAIT, "diff for b's second status change", mark2)
  const n2 = verifySwap(d2.payload, b, n1.phx_ref, "custom status")
  assertEq(n2.status, "in_a_meeting", "custom status")
  await sleep(200) // absence check: no extra diff for b
  assertEq(ta.ev.since(mark, isDiffFor(b)).length, 2, "number of diffs for two status pushes")
  const m2 = ta.metasOf(b)
  assert(m2 && m2.length === 1 && m2[0].status === "in_a_meeting", () => `observer list for b after updates: ${show(m2)}`)
  assertAlwaysPresent(ta, b, mark, "status updates")
})

check("room: broadcast {event, payload} replies ok, reaches every other member (not the sender, unless the push says self: true), not other rooms", async ctx => {
  const room = ROOM("bcast")
  const mk = async (label, topic) => {
    const s = await openSocket(ctx, {label, token: userToken(USER(label))})
    const ch = channelOf(s, topic)
    for(const ev of ["poke", "poke_self"]){ listen(ch, ev) }
    await joinOk(ch)
    return ch
  }
  const A = await mk("sender", room)
  const B = await mk("b", room)
  const C = await mk("c", room)
  const D = await mk("elsewhere", ROOM("bcast_other"))
  const payload = {n: 1, text: "hi", nested: {list: [1, 2, 3]}}
  await pushOk(A, "broadcast", {event: "poke", payload})
  for(const [label, ch] of [["b", B], ["c", C]]){
    const e = await ch.ev.waitFor(e => e.kind === "event" && e.event === "poke", WAIT, `${label} to receive "poke"`)
    assertEq(e.payload, payload, `${label}: payload of "poke"`)
  }
  await sleep(300) // absence check
  assert(!A.ev.items.some(e => e.kind === "event" && e.event === "poke"), "the sender received its own broadcast without self: true")
  assert(!D.ev.items.some(e => e.kind === "event"), "a member of another room received the broadcast")
  assertEq(B.ev.items.filter(e => e.kind === "event" && e.event === "poke").length, 1, "times b received poke")

  // `self` sits on the push, beside event and payload, so no key of the user's payload is magic
  const selfPayload = {n: 2, self: true}
  await pushOk(A, "broadcast", {event: "poke_self", payload: selfPayload, self: true})
  for(const [label, ch] of [["sender", A], ["b", B], ["c", C]]){
    const e = await ch.ev.waitFor(e => e.kind === "event" && e.event === "poke_self", WAIT, `${label} to receive "poke_self" (self: true)`)
    assertEq(e.payload, selfPayload, `${label}: payload of "poke_self"`)
  }
})

check("room: two sockets of one user are one key with two metas; the user leaves list() only with the last", async ctx => {
  const room = ROOM("multi")
  const u = USER("multi")
  const so = await openSocket(ctx, {label: "observer", token: userToken(USER("obs"))})
  const co = channelOf(so, room)
  const to = track(ctx, co)
  await joinOk(co)
  const token = userToken(u, {name: "Multi"})
  const sp = await openSocket(ctx, {label: "phone", token})
  const cp = channelOf(sp, room, {status: "online", meta: {device: "phone"}})
  await joinOk(cp)
  const sl = await openSocket(ctx, {label: "laptop", token})
  const cl = channelOf(sl, room, {status: "busy", meta: {device: "laptop"}})
  await joinOk(cl)
  const metas = await until(() => { const m = to.metasOf(u); return m && m.length === 2 && m }, WAIT,
    () => `one key ${u} with two metas: ${show(to.users())}`)
  assertEq(metas.map(m => m.device).sort(), ["laptop", "phone"], "devices of the two metas")
  assert(metas[0].phx_ref !== metas[1].phx_ref, "the two metas share a phx_ref")
  const mark = to.ev.mark

  assertEq(await leaveReply(cl), "ok", "laptop leave reply")
  const d1 = await to.ev.waitFor(isDiffFor(u), WAIT, "diff for the laptop's leave", mark)
  assert(has(d1.payload.leaves, u) && d1.payload.leaves[u].metas.every(m => m.device === "laptop"), () => `leave diff must carry only the laptop meta: ${show(d1.payload)}`)
  const m1 = await until(() => { const m = to.metasOf(u); return m && m.length === 1 && m }, WAIT, () => `one meta left: ${show(to.metasOf(u))}`)
  assertEq(m1[0].device, "phone", "remaining meta's device")
  assertAlwaysPresent(to, u, mark, "first session leaving")

  assertEq(await leaveReply(cp), "ok", "phone leave reply")
  await until(() => !to.metasOf(u), WAIT, () => `${u} gone after the last session left: ${show(to.metasOf(u))}`)
})

check("room: channel.leave() replies ok and observers get a leave-only diff at once (no grace)", async ctx => {
  const room = ROOM("leave")
  const u = USER("leaver")
  const so = await openSocket(ctx, {label: "observer", token: userToken(USER("obs"))})
  const co = channelOf(so, room)
  const to = track(ctx, co)
  await joinOk(co)
  const su = await openSocket(ctx, {label: "leaver", token: userToken(u)})
  const cu = channelOf(su, room, {meta: {device: "tab"}})
  await joinOk(cu)
  await until(() => to.metasOf(u), WAIT, () => `${u} present: ${show(to.users())}`)
  const mark = to.ev.mark
  const t0 = now()
  assertEq(await leaveReply(cu), "ok", "leave reply")
  const d = await to.ev.waitFor(isDiffFor(u), WAIT, "leave diff", mark)
  assert(has(d.payload.leaves, u) && !has(d.payload.joins, u), () => `expected a leave-only diff: ${show(d.payload)}`)
  const dt = d.at - t0
  ctx.note(`leave diff after ${ms(dt)}`)
  assert(dt < IMMEDIATE, () => `leave diff took ${ms(dt)}; an explicit leave must not wait for the grace window (limit ${ms(IMMEDIATE)})`)
  assert(!to.metasOf(u), "user still listed after leaving")
  assert(su.isConnected(), "socket disconnected by a channel leave")
})

// ---- grace window ---------------------------------------------------------------------------

async function graceSetup(ctx, tag, joinMeta){
  const room = ROOM(tag)
  const u = USER(tag)
  const so = await openSocket(ctx, {label: "observer", token: userToken(USER("obs"))})
  const co = channelOf(so, room)
  const to = track(ctx, co)
  await joinOk(co)
  return {room, u, to, token: userToken(u, {name: `Grace ${tag}`}), joinPayload: {status: "online", meta: joinMeta}}
}

async function expectLeaveAfterGrace(ctx, to, u, mark, t0, how){
  const d = await to.ev.waitFor(isDiffFor(u), LATE + 500, `leave diff for ${u} after ${how}`, mark)
  const dt = d.at - t0
  ctx.note(`${how}: leave diff after ${ms(dt)} (grace ${GRACE} ms)`)
  assert(has(d.payload.leaves, u) && !has(d.payload.joins, u), () => `expected a leave-only diff: ${show(d.payload)}`)
  assert(dt >= EARLY, () => `leave came after ${ms(dt)}, before the grace window (expected >= ${ms(EARLY)})`)
  assert(dt <= LATE, () => `leave came after ${ms(dt)}, later than grace + 2000 (${ms(LATE)})`)
  assertAlwaysPresent(to, u, mark, "the grace window", d.seq)
  await sleep(Math.max(500, GRACE)) // absence check: the leave comes once
  assertEq(to.ev.since(mark, isDiffFor(u)).length, 1, `diffs mentioning ${u} after ${how}`)
  assert(!to.metasOf(u), () => `${u} still listed after the grace window: ${show(to.metasOf(u))}`)
}

check("grace: phoenix.js socket.disconnect() (no phx_leave) keeps the meta for grace_ms, then exactly one leave-only diff", async ctx => {
  const g = await graceSetup(ctx, "drop", {device: "tab1"})
  const s = await openSocket(ctx, {label: "dropper", token: g.token})
  const ch = channelOf(s, g.room, g.joinPayload)
  await joinOk(ch)
  await until(() => g.to.metasOf(g.u), WAIT, () => `${g.u} present: ${show(g.to.users())}`)
  const mark = g.to.ev.mark
  const t0 = now()
  s.disconnect()
  await expectLeaveAfterGrace(ctx, g.to, g.u, mark, t0, "socket.disconnect()")
}, 20000 + 2 * GRACE)

check("grace: killed transport (raw ws terminate, no close frame) keeps the meta for grace_ms, then one leave-only diff", async ctx => {
  const g = await graceSetup(ctx, "kill", {device: "raw"})
  const r = await Raw.open(ctx, {token: g.token, label: "victim"})
  await r.joinOk(g.room, g.joinPayload)
  await until(() => g.to.metasOf(g.u), WAIT, () => `${g.u} present: ${show(g.to.users())}`)
  const mark = g.to.ev.mark
  const t0 = now()
  r.kill()
  await expectLeaveAfterGrace(ctx, g.to, g.u, mark, t0, "terminate()")
}, 20000 + 2 * GRACE)

async function expectSingleSwap(ctx, to, u, oldRef, mark, t0, device, how){
  const d = await to.ev.waitFor(isDiffFor(u), LATE, `a diff for ${u} after ${how}`, mark)
  ctx.note(`${how}: swap diff after ${ms(d.at - t0)}`)
  const nm = verifySwap(d.payload, u, oldRef, how)
  assertEq(nm.device, device, "meta.device of the new meta")
  await sleepUntil(t0 + GRACE + 1000) // timing is the point: nothing else may follow when the old grace expires
  const diffs = to.ev.since(mark, isDiffFor(u))
  assert(!diffs.some(e => has(e.payload.leaves, u) && !has(e.payload.joins, u)), () => `a leave-only diff for ${u} was sent: ${show(diffs.map(e => e.payload))}`)
  assertEq(diffs.length, 1, `diffs mentioning ${u} within grace + 1 s`)
  const metas = to.metasOf(u)
  assert(metas && metas.length === 1 && metas[0].phx_ref === nm.phx_ref, () => `${u} must be listed with exactly the new meta: ${show(metas)}`)
  assertAlwaysPresent(to, u, mark, how)
  return nm
}

// A reconnect that comes back exactly as it left takes its ghost's place silently: same phx_ref,
// no diff at all for anyone (no flapping), and no leave when the old grace runs out.
async function expectSilentReclaim(ctx, to, u, oldRef, mark, t0, how){
  await sleepUntil(t0 + GRACE + 1000) // timing is the point: nothing may come, not even when the old grace expires
  const diffs = to.ev.since(mark, isDiffFor(u))
  assertEq(diffs.length, 0, `diffs mentioning ${u} within grace + 1 s of ${how} (${show(diffs.map(e => e.payload))})`)
  const metas = to.metasOf(u)
  assert(metas && metas.length === 1 && metas[0].phx_ref === oldRef, () => `${u} must still be listed once with its old phx_ref ${oldRef}: ${show(metas)}`)
  assertAlwaysPresent(to, u, mark, how)
  ctx.note(`${how}: no diff, phx_ref kept`)
}

// The user of `g` joins, drops (socket.disconnect(), no phx_leave) and reconnects on a fresh socket
// with `rejoinPayload`, within the grace window. Returns the first meta and the observer's mark.
async function dropAndRejoin(ctx, g, rejoinPayload){
  const s1 = await openSocket(ctx, {label: "phone-1", token: g.token})
  const c1 = channelOf(s1, g.room, g.joinPayload)
  await joinOk(c1)
  const m0 = await until(() => g.to.metasOf(g.u), WAIT, () => `${g.u} present: ${show(g.to.users())}`)
  const mark = g.to.ev.mark
  const t0 = now()
  s1.disconnect()
  // let the close handshake finish, so the server has seen the drop before the new join
  await s1.ev.waitFor(e => e.kind === "close", Math.max(100, Math.floor(GRACE / 4)), "close").catch(() => {})
  const s2 = await openSocket(ctx, {label: "phone-2", token: g.token})
  await joinOk(channelOf(s2, g.room, rejoinPayload))
  const tj = now() - t0
  assert(tj < GRACE, () => `internal: the reconnect took ${ms(tj)}, not within the grace window of ${GRACE} ms`)
  return {m0, mark, t0}
}

check("grace: same user reconnecting within grace with the same meta.device and an unchanged meta causes NO diff at all and keeps its phx_ref", async ctx => {
  const g = await graceSetup(ctx, "recon", {device: "phone"})
  const {m0, mark, t0} = await dropAndRejoin(ctx, g, g.joinPayload)
  await expectSilentReclaim(ctx, g.to, g.u, m0[0].phx_ref, mark, t0, "reconnect with the same device")
}, 20000 + 2 * GRACE)

check("grace: same device reconnecting within grace with a new status gets ONE swap diff (joins+leaves), never leave-then-join", async ctx => {
  const g = await graceSetup(ctx, "reswap", {device: "phone"})
  const {m0, mark, t0} = await dropAndRejoin(ctx, g, {...g.joinPayload, status: "away"})
  const nm = await expectSingleSwap(ctx, g.to, g.u, m0[0].phx_ref, mark, t0, "phone", "reconnect with a new status")
  assertEq(nm.status, "away", "status of the swapped-in meta")
}, 20000 + 2 * GRACE)

check("grace: phoenix.js auto-reconnect after the transport is killed causes no diff and gets a fresh presence_state", async ctx => {
  const g = await graceSetup(ctx, "auto", {device: "tab-auto"})
  const s = await openSocket(ctx, {label: "auto", token: g.token, reconnectAfterMs: () => 20})
  const ch = channelOf(s, g.room, g.joinPayload)
  const tu = track(ctx, ch, "self")
  await joinOk(ch)
  const m0 = await until(() => g.to.metasOf(g.u), WAIT, () => `${g.u} present: ${show(g.to.users())}`)
  await tu.ev.waitFor(e => e.kind === "state", WAIT, "first presence_state")
  const mark = g.to.ev.mark
  const selfMark = tu.ev.mark
  const joinMark = ch.ev.mark
  const t0 = now()
  s.conn.terminate() // the TCP connection dies without a close frame; phoenix.js reconnects and rejoins
  await ch.ev.waitFor(e => e.kind === "joined", GRACE, "phoenix.js to reconnect and rejoin within the grace window", joinMark)
  await tu.ev.waitFor(e => e.kind === "state", WAIT, "a presence_state for the rejoin (phoenix.js Presence buffers diffs until it comes)", selfMark)
  await expectSilentReclaim(ctx, g.to, g.u, m0[0].phx_ref, mark, t0, "phoenix.js reconnect")
  await until(() => { const m = tu.metasOf(g.u); return m && m.length === 1 && m[0].phx_ref === m0[0].phx_ref }, WAIT, () => `the reconnected client lists itself once, with its kept ref: ${show(tu.users())}`)
}, 20000 + 2 * GRACE)

// ---- heartbeat and idle timeout -------------------------------------------------------------

check("heartbeat: a raw client that joins and then sends nothing (no pongs either) is closed within timeout_ms + 2000", async ctx => {
  const r = await Raw.open(ctx, {token: userToken(USER("silent")), heartbeat: false, autoPong: false, label: "silent"})
  await r.joinOk(ROOM("silent"), {status: "online"})
  const tLast = r.lastSent
  const c = await r.waitClose(TIMEOUT + 2000 + 1000, `the server to close a socket silent for timeout_ms (${TIMEOUT} ms)`)
  const dt = c.at - tLast
  ctx.note(`closed ${ms(dt)} after the last frame, code ${c.code} ${show(c.reason)}`)
  assert(dt <= TIMEOUT + 2000, () => `closed after ${ms(dt)}, later than timeout + 2000 (${TIMEOUT + 2000} ms)`)
  assert(dt >= TIMEOUT * 0.8, () => `closed after ${ms(dt)}, before the idle timeout (${TIMEOUT} ms)`)
}, 20000 + TIMEOUT)

check("heartbeat: a phoenix.js socket with heartbeatIntervalMs below timeout_ms stays connected past the timeout", async ctx => {
  const s = await openSocket(ctx, {label: "beating", token: userToken(USER("beat"))})
  const ch = channelOf(s, ROOM("beat"), {status: "online"})
  await joinOk(ch)
  const mark = s.ev.mark
  await sleep(TIMEOUT + 1000) // timing is the point
  const bad = s.ev.since(mark, e => e.kind === "close" || e.kind === "error")
  assert(bad.length === 0, () => `socket ${bad[0].kind} during the idle period: ${show(bad[0])}`)
  assert(s.isConnected(), "socket not connected after timeout_ms")
  const replies = s.ev.since(mark, e => e.kind === "msg" && e.msg.topic === "phoenix" && e.msg.event === "phx_reply" && e.msg.payload && e.msg.payload.status === "ok")
  assert(replies.length >= 2, () => `expected >= 2 heartbeat replies in ${ms(TIMEOUT + 1000)} at ${HB_MS} ms intervals, got ${replies.length}`)
  assertEq(ch.state, "joined", "channel state")
  await pushOk(ch, "status", {status: "away"})
  const rtt = await withTimeout(new Promise(resolve => s.ping(resolve)), WAIT, "socket.ping() got no heartbeat reply")
  ctx.note(`${replies.length} heartbeat replies; ping rtt ${ms(rtt)}`)
}, 20000 + TIMEOUT)

// ---- errors are replies; the socket stays usable ---------------------------------------------

async function errorJoinCheck(ctx, topic, payload, reason){
  const s = await openSocket(ctx, {label: "erring", token: userToken(USER("err"))})
  const ch = channelOf(s, topic, payload)
  await joinError(ch, reason)
  await provePhoenixUsable(s, `a ${reason} join`)
}

check("error: join of unknown topic foo:bar -> unknown_topic; socket stays usable", ctx =>
  errorJoinCheck(ctx, "foo:bar", {}, "unknown_topic"))

check("error: join of account:<other id> with an end-user token -> unauthorized; socket stays usable", ctx =>
  errorJoinCheck(ctx, `account:acc_other_${rand()}`, {}, "unauthorized"))

check("error: join of account:<own id> with an end-user token -> unauthorized; socket stays usable", ctx =>
  errorJoinCheck(ctx, `account:${env.ACCOUNT}`, {}, "unauthorized"))

check("error: join of a room name of 300 chars -> invalid_room_name; socket stays usable", ctx =>
  errorJoinCheck(ctx, `room:${"r".repeat(300)}`, {}, "invalid_room_name"))

check("error: join of a room name containing a space -> invalid_room_name; socket stays usable", ctx =>
  errorJoinCheck(ctx, `room:has space ${rand()}`, {}, "invalid_room_name"))

check("error: join with an oversized meta (frame still under max_frame_bytes) -> meta_too_large; socket stays usable", async ctx => {
  const room = ROOM("bigmeta")
  const overhead = JSON.stringify(["99", "99", room, "phx_join", {status: "online", meta: {blob: ""}}]).length
  const room4frame = MAX_FRAME - overhead - 256 // the whole join frame stays under max_frame_bytes
  let n = room4frame
  if(env.MAX_META){
    n = env.MAX_META + 64
    if(n > room4frame){ ctx.skip(`PRESENCED_MAX_META (${env.MAX_META}) does not fit under PRESENCED_MAX_FRAME (${MAX_FRAME})`) }
  } else if(n < 1024){
    ctx.skip(`max_frame_bytes ${MAX_FRAME} leaves no room for an oversized meta; set PRESENCED_MAX_META`)
  }
  ctx.note(`join meta of ${n + 11} JSON bytes in a frame of ${overhead + n} bytes`)
  await errorJoinCheck(ctx, room, {status: "online", meta: {blob: "m".repeat(n)}}, "meta_too_large")
})

check("error: unknown event pushed on a joined room -> unknown_event; channel and socket stay usable", async ctx => {
  const s = await openSocket(ctx, {label: "erring", token: userToken(USER("err"))})
  const ch = channelOf(s, ROOM("unknownevent"), {status: "online"})
  await joinOk(ch)
  const r = await pushReply(ch, "frobnicate", {x: 1})
  assert(r.status === "error", () => `push frobnicate: expected an error reply, got ${r.status} ${show(r.response)}`)
  assertReason(r.response, "unknown_event", "push frobnicate")
  assertEq(ch.state, "joined", "channel state after the error")
  await pushOk(ch, "status", {status: "away"})
  await provePhoenixUsable(s, "an unknown_event push")
})

check("error: push on a topic not joined (raw) -> not_joined, topic and ref echoed; socket stays usable", async ctx => {
  const r = await Raw.open(ctx, {token: userToken(USER("notjoined")), label: "raw"})
  const room = ROOM("notjoined")
  for(const [event, payload] of [["status", {status: "away"}], ["broadcast", {event: "x", payload: {}}]]){
    const rep = await r.request("j-stale", room, event, payload)
    assertEq(rep.frame.slice(1, 4), [rep.ref, room, "phx_reply"], `${event}: reply header [ref, topic, event]`)
    assertEq(rep.status, "error", `${event}: reply status`)
    assertReason(rep.response, "not_joined", `${event} on a topic not joined`)
  }
  await proveRawUsable(r, "not_joined errors")
})

check("error: more than max_joins_per_socket joins on one socket -> too_many_joins; leaving one makes room again", async ctx => {
  const s = await openSocket(ctx, {label: "joiner", token: userToken(USER("many"))})
  const chans = []
  for(let i = 0; i < MAX_JOINS; i++){ chans.push(channelOf(s, ROOM(`many${i}`), {status: "online"})) }
  const replies = await Promise.all(chans.map(ch => joinReply(ch)))
  const bad = replies.findIndex(r => r.status !== "ok")
  assert(bad < 0, () => `join ${bad + 1} of ${MAX_JOINS} (within the limit) got ${replies[bad].status} ${show(replies[bad].response)}`)
  await joinError(channelOf(s, ROOM("many_over"), {status: "online"}), "too_many_joins")
  assertEq(await leaveReply(chans[0]), "ok", "leave reply")
  await joinOk(channelOf(s, ROOM("many_again"), {status: "online"}))
  assert(s.isConnected(), "socket disconnected")
}, 30000)

check("error: malformed frames (not JSON, not an array, wrong arity, wrong types) -> malformed_frame; socket stays open", async ctx => {
  const r = await Raw.open(ctx, {token: userToken(USER("malformed")), label: "raw"})
  // [label, text, readable topic, readable ref]: the reply's topic must be the frame's topic when
  // it can be read (a string) or "phoenix"; its ref the frame's ref when readable, or null.
  const cases = [
    ["not JSON", "this is not json"],
    ["truncated JSON", "[null,\"m1\",\"room:x\","],
    ["JSON object without fields", "{\"hello\":\"world\"}"],
    ["V1-style JSON object", JSON.stringify({topic: "room:m", event: "phx_join", payload: {}, ref: "m2"}), "room:m", "m2"],
    ["JSON number", "42"],
    ["empty array", "[]"],
    ["array of 4", JSON.stringify([null, "m4", "room:m", "phx_join"]), "room:m", "m4"],
    ["array of 6", JSON.stringify([null, "m6", "room:m", "phx_join", {}, "extra"]), "room:m", "m6"],
    ["non-string topic", JSON.stringify([null, "m7", 123, "phx_join", {}]), undefined, "m7"],
    ["non-string event", JSON.stringify([null, "m8", "room:m", null, {}]), "room:m", "m8"],
  ]
  for(const [label, text, topic, ref] of cases){
    const mark = r.ev.mark
    r.sendRaw(text)
    const f = await r.errorReply(mark, label)
    assertReason(f[4].response, "malformed_frame", label)
    assert(f[2] === "phoenix" || (topic !== undefined && f[2] === topic),
      () => `${label}: reply topic must be the frame's topic when readable, otherwise "phoenix"; got ${show(f[2])}`)
    assert(f[1] === null || (ref !== undefined && f[1] === ref),
      () => `${label}: reply ref must be the frame's ref when readable, otherwise null; got ${show(f[1])}`)
    ctx.note(`${label}: reply topic ${show(f[2])} ref ${show(f[1])}`)
    await r.heartbeatOk(`after ${label}`)
  }
  await proveRawUsable(r, "malformed frames")
})

check("error: text frame over max_frame_bytes (under 1 MiB) -> frame_too_large; socket stays open", async ctx => {
  const target = MAX_FRAME + 1024
  if(target >= 1024 * 1024){ ctx.skip(`max_frame_bytes ${MAX_FRAME} is too close to 1 MiB`) }
  const r = await Raw.open(ctx, {token: userToken(USER("bigframe")), label: "raw"})
  const room = ROOM("bigframe")
  const j = await r.joinOk(room, {status: "online"})
  const base = JSON.stringify([j.joinRef, "big1", room, "broadcast", {event: "x", payload: {pad: ""}}])
  const text = JSON.stringify([j.joinRef, "big1", room, "broadcast", {event: "x", payload: {pad: "p".repeat(target - base.length)}}])
  assertEq(text.length, target, "internal: frame size")
  const mark = r.ev.mark
  r.sendRaw(text)
  const f = await r.errorReply(mark, `a ${text.length}-byte frame`)
  assertReason(f[4].response, "frame_too_large", `${text.length}-byte frame`)
  assert((f[2] === "phoenix" && f[1] === null) || (f[2] === room && f[1] === "big1"), () => `reply topic/ref ${show([f[2], f[1]])}`)
  await proveRawUsable(r, "an oversized frame")
})

check("error: binary frame -> malformed_frame or binary_not_supported; socket stays open", async ctx => {
  const r = await Raw.open(ctx, {token: userToken(USER("binary")), label: "raw"})
  const mark = r.ev.mark
  r.sendRaw(Buffer.from([0xde, 0xad, 0xbe, 0xef, 0x00, 0x01]), {binary: true})
  const f = await r.errorReply(mark, "a binary frame")
  assertReason(f[4].response, ["malformed_frame", "binary_not_supported"], "binary frame")
  await proveRawUsable(r, "a binary frame")
})

// ---- account channel --------------------------------------------------------------------------

check("account: dashboard token joins account:<id>; Presence shows a user per connection as they join, and drops them after grace", async ctx => {
  const sd = await openSocket(ctx, {label: "dashboard", token: env.DASHBOARD_TOKEN})
  const cd = channelOf(sd, `account:${env.ACCOUNT}`)
  const td = track(ctx, cd, "dashboard")
  await joinOk(cd)
  await td.ev.waitFor(e => e.kind === "state", WAIT, "account presence_state")
  const u = USER("acct")
  const token = userToken(u, {name: "Account Watcher"})
  assert(!td.metasOf(u), "internal: fresh user already present")

  const s1 = await openSocket(ctx, {label: "u-conn1", token})
  await joinOk(channelOf(s1, ROOM("acct1"), {status: "online", meta: {device: "phone"}}))
  await until(() => td.metasOf(u), WAIT, () => `${u} in account presence after connecting and joining a room: ${show(Object.keys(td.users()))}`)
  const mark = td.ev.mark

  const s2 = await openSocket(ctx, {label: "u-conn2", token})
  await joinOk(channelOf(s2, ROOM("acct2"), {status: "online", meta: {device: "laptop"}}))
  await until(() => { const m = td.metasOf(u); return m && m.length === 2 }, WAIT, () => `two metas (one per connection) for ${u}: ${show(td.metasOf(u))}`)

  s2.disconnect()
  await until(() => { const m = td.metasOf(u); return m && m.length === 1 }, LATE, () => `one meta after the second connection dropped: ${show(td.metasOf(u))}`)
  assertAlwaysPresent(td, u, mark, "a second connection dropping")

  const t0 = now()
  s1.disconnect()
  await until(() => !td.metasOf(u), LATE + 500, () => `${u} gone from account presence after the last connection dropped: ${show(td.metasOf(u))}`)
  const dt = now() - t0
  ctx.note(`account-level leave ${ms(dt)} after the drop`)
  assert(dt >= EARLY, () => `${u} left the account presence after ${ms(dt)}, before the grace window (${ms(EARLY)})`)
}, 20000 + 4 * GRACE)

// =============================================================================================
// Runner

let passed = 0
let failed = 0
let currentCtx = null
let finished = false

function report(ok, name, why){
  if(ok){ passed++; console.log(`ok - ${name}${why ? ` # SKIP ${why}` : ""}`) }
  else { failed++; console.log(`not ok - ${name}: ${String(why).replace(/\s*\n\s*/g, " ")}`) }
}

// Assertion failures and I/O errors print their message; a bug in this file also prints where.
function describe(err){
  if(err instanceof CheckError){ return err.message }
  if(err instanceof TypeError || err instanceof ReferenceError || err instanceof RangeError || err instanceof SyntaxError){
    return (err.stack || String(err)).split("\n").slice(0, 3).join(" ")
  }
  return (err && err.message) || String(err)
}

function finish(){
  if(finished){ return }
  finished = true
  console.log(`${passed} passed, ${failed} failed`)
  process.exit(failed === 0 && passed > 0 ? 0 : 1)
}

process.on("uncaughtException", e => {
  if(currentCtx){ currentCtx.async.push(e) } else { console.log(`# uncaught exception outside a check: ${e && e.stack}`) }
})
process.on("unhandledRejection", e => {
  if(currentCtx){ currentCtx.async.push(e) } else { console.log(`# unhandled rejection outside a check: ${e && e.stack}`) }
})

function version(pkg){
  try { return JSON.parse(fs.readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url), "utf8")).version } catch { return "?" }
}

async function main(){
  const suiteTimer = setTimeout(() => {
    report(false, currentCtx ? currentCtx.name : "suite", `global timeout of ${env.SUITE_MS} ms reached`)
    finish()
  }, env.SUITE_MS)
  console.log(`# presenced conformance: phoenix ${version("phoenix")}, ws ${version("ws")}, node ${process.version}`)
  console.log(`# ws=${env.WS} http=${env.HTTP} account=${env.ACCOUNT} grace=${GRACE}ms timeout=${TIMEOUT}ms max_frame=${MAX_FRAME} max_joins=${MAX_JOINS} heartbeat=${HB_MS}ms`)
  const selected = checks.filter(c => !env.ONLY || env.ONLY.test(c.name))
  for(const c of selected){
    const ctx = new Ctx(c.name)
    currentCtx = ctx
    let err = null
    try {
      await withTimeout(Promise.resolve().then(() => c.fn(ctx)), c.timeoutMs, `check did not finish within ${c.timeoutMs} ms`)
      const shape = ctx.trackers.flatMap(tr => tr.shape)
      if(shape.length){ throw new CheckError(`malformed presence payload: ${shape[0]}`) }
      if(ctx.async.length){ throw ctx.async[0] }
    } catch (e){
      err = e
    }
    currentCtx = null
    ctx.cleanup()
    if(err instanceof SkipCheck){ report(true, c.name, err.message) }
    else if(err){ report(false, c.name, describe(err)) }
    else { report(true, c.name) }
    for(const n of ctx.notes){ console.log(`#   ${n}`) }
    for(const e of ctx.async.slice(err === ctx.async[0] ? 1 : 0)){ console.log(`#   also: ${(e && e.message) || e}`) }
  }
  clearTimeout(suiteTimer)
  finish()
}

main().catch(e => {
  report(false, "suite", describe(e))
  finish()
})
