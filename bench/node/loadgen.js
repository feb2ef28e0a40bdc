'use strict';
// Portal Hub benchmark load generator: many socket.io-client connections plus HTTP publishers,
// driven by one JSON command per line on stdin; one JSON answer per line on stdout.
// The same program drives the hub and the Node socket.io reference server.
//
// Commands:
//   {"cmd":"connect","url":...,"auths":[{...}],"count":N,"ready":"snapshot","parallel":50,
//    "timeout":60,"max_seconds":S}
//       opens `count` more websocket-only connections, auth objects taken round-robin;
//       answers once each got its `ready` event. With "deflate":false the client does not
//       offer permessage-deflate (a browser always does). With "max_seconds", no connection
//       is started after that many seconds (those under way finish or time out).
//   {"cmd":"publish","mode":"rate"|"closed"|"window","senders":[{"url","headers","body"}],
//    "rate":50,"window":4,"duration":20,"warmup":2,"expect":1,"drain":10,"key":"client_id",
//    "max_messages":N}
//       sends POSTs (each body gets a fresh `client_id`, or `key`), times every receipt of
//       `im.message` carrying one of those ids; answers with the statistics. "rate": open
//       loop at that many messages/s; "closed": one request in flight per sender; "window":
//       a new message whenever fewer than `window` are not yet received by `expect` clients.
//       Every client's receipts are checked: a message it got twice is "doubled", one whose
//       stream seq is below one it already got on that stream is "out of order"; a message
//       accepted (2xx) but not received by `expect` clients after the drain is "lost".
//   {"cmd":"seed","url":...,"chats":[{"chat_id","tokens":[...]}],"start":I,"count":N,
//    "parallel":32,"max_seconds":S}
//       POSTs messages I .. I+N-1 with `parallel` in flight: message i goes to chat
//       i % chats.length, written by that chat's token floor(i / chats.length) % tokens, with
//       client_id "h-<i>". Stops after N messages or S seconds; answers how far it got.
//   {"cmd":"disconnect","keep":K}   closes every connection but the first K (default 0).
//   {"cmd":"exit"}
// Every loop is bounded by a count or a deadline. On end of stdin it closes everything and exits.
const { io } = require('socket.io-client');
const readline = require('node:readline');
const { performance } = require('node:perf_hooks');

const clients = [];
let run = null; // the publish run in progress: {sent: Map<id, t0>, ...}
let runCounter = 0;
const lost = []; // reasons of connections the server closed while the benchmark ran

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function log(...args) {
  process.stderr.write('[loadgen] ' + args.join(' ') + '\n');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const GRACE_MS = 500; // after the drain, receipts still counted (doubles)

function onMessage(socket, envelope) {
  const r = run;
  if (r === null) return;
  const now = performance.now();
  const message = envelope && envelope.data && envelope.data.message;
  const id = message && message[r.key];
  if (typeof id !== 'string') return;
  const sent = r.sent.get(id);
  if (sent === undefined) return;
  // This client's own account of the run: how often it got each message, and the last seq
  // it got on each stream.
  let mine = socket.benchRun;
  if (mine === undefined || mine.run !== r.id) {
    mine = socket.benchRun = { run: r.id, counts: new Uint8Array(256), last: new Map() };
  }
  if (sent.n >= mine.counts.length) {
    const grown = new Uint8Array(Math.max(2 * mine.counts.length, sent.n + 1));
    grown.set(mine.counts);
    mine.counts = grown;
  }
  const before = mine.counts[sent.n];
  if (before < 255) mine.counts[sent.n] = before + 1;
  if (before > 0) {
    r.doubled += 1;
    return;
  }
  if (typeof envelope.seq === 'number') {
    const last = mine.last.get(envelope.stream);
    if (last !== undefined && envelope.seq <= last) r.outOfOrder += 1;
    else mine.last.set(envelope.stream, envelope.seq);
  }
  const t0 = sent.t0;
  r.received += 1;
  const got = (r.receipts.get(id) || 0) + 1;
  r.receipts.set(id, got);
  if (got === r.expect) r.complete += 1;
  if (t0 >= r.windowStart && t0 < r.windowEnd) {
    r.latencies.push(now - t0);
    if (got === r.expect) r.completeLatencies.push(now - t0);
  }
  if (now >= r.windowStart && now < r.windowEnd) {
    r.windowReceived += 1;
    const bucket = Math.floor((now - r.windowStart) / 1000);
    r.timeline[bucket] = (r.timeline[bucket] || 0) + 1;
  }
  if (r.onProgress !== null) r.onProgress();
}

function connectOne(url, auth, ready, timeoutMs, deflate) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const socket = io(url, {
      transports: ['websocket'],
      auth,
      forceNew: true,
      reconnection: false,
      timeout: timeoutMs,
      // like a browser, the client offers permessage-deflate unless told not to
      perMessageDeflate: deflate === false ? false : { threshold: 1024 },
    });
    let done = false;
    const finish = (ok, why) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve({ ok, socket, seconds: (performance.now() - t0) / 1000, why });
    };
    const timer = setTimeout(() => finish(false, 'timeout'), timeoutMs);
    socket.on('im.message', (envelope) => onMessage(socket, envelope));
    socket.on('connect_error', (err) => finish(false, String(err && err.message)));
    socket.on('disconnect', (reason) => {
      if (!done) finish(false, 'disconnect: ' + reason);
      else if (!socket.benchClosing) lost.push(reason);
    });
    if (ready === 'connect') socket.on('connect', () => finish(true));
    else socket.once(ready, () => finish(true));
  });
}

async function connect(cmd) {
  const count = cmd.count;
  const parallel = Math.max(1, cmd.parallel || 50);
  const timeoutMs = (cmd.timeout || 60) * 1000;
  const t0 = performance.now();
  const stopAt = t0 + (cmd.max_seconds || 1e6) * 1000;
  const setup = [];
  const failures = {};
  let next = 0;
  async function worker() {
    while (next < count && performance.now() < stopAt) {
      const i = next++;
      const auth = cmd.auths[(clients.length + i) % cmd.auths.length];
      const result = await connectOne(cmd.url, auth, cmd.ready || 'connect', timeoutMs, cmd.deflate);
      if (result.ok) {
        clients.push(result.socket);
        setup.push(result.seconds * 1000);
      } else {
        result.socket.benchClosing = true;
        result.socket.close();
        failures[result.why] = (failures[result.why] || 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(parallel, count) }, worker));
  const seconds = (performance.now() - t0) / 1000;
  return {
    ok: Object.keys(failures).length === 0,
    connected: setup.length,
    attempted: next,
    capped: next < count,
    total: clients.length,
    failures,
    seconds,
    per_second: setup.length / seconds,
    setup_ms: summary(setup),
  };
}

async function disconnect(keep) {
  const n = clients.length - Math.min(keep || 0, clients.length);
  for (const socket of clients.splice(keep || 0)) {
    socket.benchClosing = true;
    socket.close();
  }
  await sleep(500);
  return { ok: true, closed: n, total: clients.length, lost: lost.splice(0) };
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[rank];
}

function summary(values) {
  if (values.length === 0) return { n: 0, p50: null, p90: null, p99: null, max: null, mean: null };
  const sorted = Float64Array.from(values).sort();
  let total = 0;
  for (const v of sorted) total += v;
  return {
    n: sorted.length,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted[sorted.length - 1],
    mean: total / sorted.length,
  };
}

async function post(r, sender) {
  const n = r.count++;
  const id = `b${r.id}-${n}`;
  const body = Object.assign({}, sender.body, { [r.key]: id, text: `bench ${id}` });
  const t0 = performance.now();
  r.sent.set(id, { t0, n });
  if (t0 >= r.windowStart && t0 < r.windowEnd) r.windowSent += 1;
  r.inflight += 1;
  try {
    const response = await fetch(sender.url, {
      method: 'POST',
      headers: Object.assign({ 'content-type': 'application/json' }, sender.headers || {}),
      body: JSON.stringify(body),
    });
    await response.arrayBuffer();
    const status = String(response.status);
    r.status[status] = (r.status[status] || 0) + 1;
    if (response.status >= 300) r.failed.add(id);
  } catch (err) {
    const why = 'error: ' + String((err && err.cause && err.cause.code) || err);
    r.status[why] = (r.status[why] || 0) + 1;
    r.failed.add(id);
  } finally {
    r.inflight -= 1;
  }
  if (t0 >= r.windowStart && t0 < r.windowEnd) r.http.push(performance.now() - t0);
}

async function publish(cmd) {
  const start = performance.now();
  const warmupMs = (cmd.warmup || 0) * 1000;
  const durationMs = cmd.duration * 1000;
  const r = {
    id: ++runCounter,
    key: cmd.key || 'client_id',
    expect: cmd.expect,
    sent: new Map(),
    receipts: new Map(),
    failed: new Set(),
    status: {},
    http: [],
    latencies: [],
    completeLatencies: [],
    count: 0,
    inflight: 0,
    received: 0,
    complete: 0,
    doubled: 0,
    outOfOrder: 0,
    windowStart: start + warmupMs,
    windowEnd: start + warmupMs + durationMs,
    windowSent: 0,
    windowReceived: 0,
    timeline: [],
    onProgress: null,
  };
  run = r;
  const end = r.windowEnd;
  const senders = cmd.senders;
  const maxMessages = cmd.max_messages || 1e7;
  const tasks = [];
  if (cmd.mode === 'rate') {
    // Open loop: message i leaves at start + i / rate, whatever the answers to earlier ones.
    const interval = 1000 / cmd.rate;
    for (let i = 0; i < maxMessages; i++) {
      const due = start + i * interval;
      if (due >= end) break;
      const wait = due - performance.now();
      if (wait > 1) await sleep(wait);
      tasks.push(post(r, senders[i % senders.length]));
    }
  } else if (cmd.mode === 'closed') {
    // Closed loop: each sender has one request in flight, the next leaves on the answer.
    const loop = async (sender) => {
      while (performance.now() < end && r.count < maxMessages) await post(r, sender);
    };
    await Promise.all(senders.map(loop));
  } else if (cmd.mode === 'window') {
    // Self-clocked: at most `window` messages not yet received by every expected client.
    const window = cmd.window || 4;
    const outstanding = () => r.count - r.complete - r.failed.size;
    let wake = null;
    r.onProgress = () => {
      if (wake !== null && outstanding() < window) {
        const w = wake;
        wake = null;
        w();
      }
    };
    let i = 0;
    while (performance.now() < end && r.count < maxMessages) {
      if (outstanding() >= window) {
        await new Promise((resolve) => {
          wake = resolve;
          setTimeout(() => {
            if (wake === resolve) wake = null;
            resolve();
          }, 1000);
        });
        continue;
      }
      tasks.push(post(r, senders[i++ % senders.length]));
      await new Promise((resolve) => setImmediate(resolve));
    }
    r.onProgress = null;
  } else {
    throw new Error('unknown mode ' + cmd.mode);
  }
  const sendEnd = performance.now();
  await Promise.all(tasks);
  // Drain: wait (bounded) until every accepted message reached every expected client.
  const drainDeadline = performance.now() + (cmd.drain || 10) * 1000;
  const expected = () => (r.count - r.failed.size) * r.expect;
  while (r.received < expected() && performance.now() < drainDeadline) await sleep(20);
  const drained = performance.now();
  // A copy sent after the first one of the last message would come after the drain is
  // complete: listen a little longer, so that it is counted as doubled.
  await sleep(GRACE_MS);
  run = null;
  const windowSeconds = (Math.min(r.windowEnd, sendEnd) - r.windowStart) / 1000;
  let windowExpected = 0;
  let windowLost = 0;
  let lostAll = 0;
  let extra = 0;
  for (const [id, sent] of r.sent) {
    if (r.failed.has(id)) continue;
    const got = r.receipts.get(id) || 0;
    lostAll += Math.max(0, r.expect - got);
    extra += Math.max(0, got - r.expect);
    if (sent.t0 < r.windowStart || sent.t0 >= r.windowEnd) continue;
    windowExpected += r.expect;
    windowLost += Math.max(0, r.expect - got);
  }
  return {
    ok: true,
    mode: cmd.mode,
    messages: r.count,
    window_seconds: windowSeconds,
    window_messages: r.windowSent,
    messages_per_second: r.windowSent / windowSeconds,
    deliveries_per_second: r.windowReceived / windowSeconds,
    expected_deliveries: windowExpected,
    lost_deliveries: windowLost,
    // over every accepted message of the run, warm-up included, after the drain
    lost: lostAll,
    doubled: r.doubled,
    out_of_order: r.outOfOrder,
    unexpected_deliveries: extra,
    failed_messages: r.failed.size,
    http_status: r.status,
    http_ms: summary(r.http),
    latency_ms: summary(r.latencies),
    complete_latency_ms: summary(r.completeLatencies),
    drain_seconds: (drained - sendEnd) / 1000,
    timeline: Array.from({ length: Math.ceil(windowSeconds) }, (_, i) => r.timeline[i] || 0),
    connections_lost: lost.length,
  };
}

const FILLER = 'a message of the seeded history, about as long as a typical chat line';

async function seed(cmd) {
  const chats = cmd.chats;
  const parallel = Math.max(1, cmd.parallel || 32);
  const first = cmd.start || 0;
  const end = first + cmd.count;
  const t0 = performance.now();
  const stopAt = t0 + (cmd.max_seconds || 1e6) * 1000;
  const status = {};
  const http = [];
  let next = first;
  let posted = 0;
  let failed = 0;
  async function worker() {
    while (next < end && performance.now() < stopAt) {
      const i = next++;
      const chat = chats[i % chats.length];
      const token = chat.tokens[Math.floor(i / chats.length) % chat.tokens.length];
      const body = { chat_id: chat.chat_id, client_id: `h-${i}`, text: `history ${i}: ${FILLER}` };
      const s = performance.now();
      let why;
      try {
        const response = await fetch(cmd.url, {
          method: 'POST',
          headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
          body: JSON.stringify(body),
        });
        await response.arrayBuffer();
        why = String(response.status);
        if (response.status < 300) posted += 1;
        else failed += 1;
      } catch (err) {
        why = 'error: ' + String((err && err.cause && err.cause.code) || err);
        failed += 1;
      }
      status[why] = (status[why] || 0) + 1;
      http.push(performance.now() - s);
    }
  }
  await Promise.all(Array.from({ length: Math.min(parallel, Math.max(1, end - first)) }, worker));
  const seconds = (performance.now() - t0) / 1000;
  return {
    ok: true,
    next,
    posted,
    failed,
    seconds,
    per_second: posted / seconds,
    http_status: status,
    http_ms: summary(http),
  };
}

async function handle(cmd) {
  switch (cmd.cmd) {
    case 'connect':
      return connect(cmd);
    case 'publish':
      return publish(cmd);
    case 'disconnect':
      return disconnect(cmd.keep);
    case 'seed':
      return seed(cmd);
    case 'exit':
      await disconnect();
      out({ ok: true });
      process.exit(0);
      return null;
    default:
      return { ok: false, error: 'unknown command ' + cmd.cmd };
  }
}

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let answer;
    try {
      answer = await handle(JSON.parse(line));
    } catch (err) {
      answer = { ok: false, error: String((err && err.stack) || err) };
    }
    out(answer);
  }
  await disconnect();
  process.exit(0);
}

main();
