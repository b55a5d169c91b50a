// Quick measurement (not the load generator): hold N idle sessions joined to rooms, read the
// server's RSS per session, and time join-to-diff on loopback.
//   node measure.mjs  (env: PRESENCED_WS, PRESENCED_ACCOUNT, PRESENCED_SECRET, SERVER_PID, N, ROOMS,
//                      PROBE_S: seconds of heartbeat round trips to time while the sessions are held,
//                      e.g. across snapshot ticks; 0 skips)
import crypto from "node:crypto"
import fs from "node:fs"
import WebSocket from "ws"

const WS = process.env.PRESENCED_WS // ws://127.0.0.1:4000/socket/websocket
const ACC = process.env.PRESENCED_ACCOUNT
const SECRET = process.env.PRESENCED_SECRET
const PID = process.env.SERVER_PID
const N = parseInt(process.env.N || "10000", 10)
const ROOMS = parseInt(process.env.ROOMS || "100", 10)
const BATCH = 500
const PROBE_S = parseInt(process.env.PROBE_S || "0", 10)

const b64 = o => Buffer.from(JSON.stringify(o)).toString("base64url")
function token(sub){
  const h = b64({alg: "HS256", typ: "JWT"}), p = b64({sub, acc: ACC, exp: Math.floor(Date.now() / 1000) + 3600})
  const s = crypto.createHmac("sha256", SECRET).update(`${h}.${p}`).digest("base64url")
  return `${h}.${p}.${s}`
}
const rssKb = () => parseInt(fs.readFileSync(`/proc/${PID}/status`, "utf8").match(/VmRSS:\s+(\d+)/)[1], 10)
const sleep = ms => new Promise(r => setTimeout(r, ms))

function open(user, i){
  return new Promise((resolve, reject) => {
    // spread over source addresses so no single address runs out of ports
    const ws = new WebSocket(`${WS}?vsn=2.0.0&token=${token(user)}`, {localAddress: `127.0.0.${2 + (i % 50)}`, perMessageDeflate: false})
    ws.on("error", reject)
    ws.on("open", () => resolve(ws))
  })
}
function joinRoom(ws, topic){
  return new Promise((resolve, reject) => {
    const onMsg = data => {
      const m = JSON.parse(data)
      if(m[3] === "phx_reply" && m[1] === "j"){ ws.off("message", onMsg); m[4].status === "ok" ? resolve() : reject(new Error(JSON.stringify(m[4]))) }
    }
    ws.on("message", onMsg)
    ws.send(JSON.stringify(["j", "j", topic, "phx_join", {status: "online"}]))
  })
}

const base = rssKb()
const t0 = Date.now()
const socks = []
for(let i = 0; i < N; i += BATCH){
  const batch = []
  for(let j = i; j < Math.min(N, i + BATCH); j++){
    batch.push(open(`user${j}`, j).then(async ws => { await joinRoom(ws, `room:r${j % ROOMS}`); ws.on("message", () => {}); return ws }))
  }
  socks.push(...await Promise.all(batch))
}
const connectS = (Date.now() - t0) / 1000
await sleep(3000)
const held = rssKb()
console.log(`sessions held: ${socks.length} in ${ROOMS} rooms, connect+join ${Math.round(socks.length / connectS)}/s`)
console.log(`server RSS: ${base} KB before, ${held} KB with sessions -> ${((held - base) / socks.length).toFixed(2)} KB per idle joined session`)

// heartbeat round trips while the node holds the sessions (and, say, writes snapshots)
if(PROBE_S > 0){
  const probe = await open("probe", 1)
  const rtt = []
  const end = Date.now() + PROBE_S * 1000
  let k = 0
  while(Date.now() < end){
    const ref = `hb${k++}`
    const t = process.hrtime.bigint()
    await new Promise(resolve => {
      const onMsg = data => { const m = JSON.parse(data); if(m[1] === ref){ probe.off("message", onMsg); resolve() } }
      probe.on("message", onMsg)
      probe.send(JSON.stringify([null, ref, "phoenix", "heartbeat", {}]))
    })
    rtt.push(Number(process.hrtime.bigint() - t) / 1e6)
    await sleep(5)
  }
  rtt.sort((a, b) => a - b)
  const h = p => rtt[Math.min(rtt.length - 1, Math.floor(p * rtt.length))].toFixed(2)
  console.log(`heartbeat reply over ${PROBE_S} s: p50 ${h(0.5)} ms, p99 ${h(0.99)} ms, p99.9 ${h(0.999)} ms, max ${rtt[rtt.length - 1].toFixed(2)} ms (n=${rtt.length})`)
  probe.terminate()
}

// join-to-diff latency: an observer in room:lat; a joiner joins and leaves, 300 times
const obs = await open("observer", 0)
await joinRoom(obs, "room:lat")
const lat = []
for(let k = 0; k < 300; k++){
  const u = `lat${k}`
  const joiner = await open(u, k)
  const seen = new Promise(resolve => {
    const onMsg = data => { const m = JSON.parse(data); if(m[3] === "presence_diff" && m[4].joins[u]){ obs.off("message", onMsg); resolve() } }
    obs.on("message", onMsg)
  })
  const t = process.hrtime.bigint()
  joiner.send(JSON.stringify(["j", "j", "room:lat", "phx_join", {}]))
  await seen
  lat.push(Number(process.hrtime.bigint() - t) / 1e6)
  joiner.send(JSON.stringify(["j", "l", "room:lat", "phx_leave", {}]))
  joiner.close()
}
lat.sort((a, b) => a - b)
const q = p => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))].toFixed(2)
console.log(`join-to-diff on loopback: p50 ${q(0.5)} ms, p90 ${q(0.9)} ms, p99 ${q(0.99)} ms, max ${lat[lat.length - 1].toFixed(2)} ms (n=${lat.length})`)
for(const s of socks) s.terminate()
obs.terminate()
process.exit(0)
